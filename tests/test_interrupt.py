"""Planned interruptions: signals and control requests become checkpoint-and-exit at a step boundary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from support import free_port, wait_until
from toy_launch import bare_ranks, baseline_sha, final_sha, torchrun, toy_env
from trainwarden.client.checkpoint import CheckpointManager
from trainwarden.client.interrupt import EXIT_CHECKPOINTED, PlannedInterrupt
from trainwarden.client.reporter import Reporter
from trainwarden.control import ClipSettings, ControlState, control_path, read_control, write_control

STEPS = 30


def test_signal_sets_flag_and_boundary_says_checkpoint_and_stop() -> None:
    """SIGUSR1 only sets a flag; the next boundary asks for a checkpoint and a stop, naming the signal."""
    previous = signal.getsignal(signal.SIGUSR1)
    guard = PlannedInterrupt((signal.SIGUSR1,)).install()
    try:
        assert guard.at_boundary(0) == guard.at_boundary(0)
        assert not guard.at_boundary(1).stop
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.should_stop()
        boundary = guard.at_boundary(2)
        assert (boundary.checkpoint, boundary.stop) == (True, True)
        assert "SIGUSR1" in boundary.reason
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_exit_uses_the_documented_code() -> None:
    """exit() raises SystemExit with EXIT_CHECKPOINTED (75, EX_TEMPFAIL) so finally blocks still run."""
    assert EXIT_CHECKPOINTED == 75
    with pytest.raises(SystemExit) as info:
        PlannedInterrupt(()).exit()
    assert info.value.code == 75


def test_control_requests_are_obeyed_once_even_across_restarts(tmp_path: Path) -> None:
    """Checkpoint and stop requests from the control file act once; a restored guard ignores them."""
    path = tmp_path / "job.control.json"

    def source() -> ControlState | None:
        return read_control(path) if path.exists() else None

    guard = PlannedInterrupt((), control=source)
    assert guard.at_boundary(0) == guard.at_boundary(0)
    write_control(path, ControlState(job="job", checkpoint_request="c1"))
    first = guard.at_boundary(1)
    assert (first.checkpoint, first.stop) == (True, False)
    assert "c1" in first.reason
    assert not guard.at_boundary(2).checkpoint, "the same request id is handled once"
    write_control(path, ControlState(job="job", checkpoint_request="c1", stop_request="s1"))
    stop = guard.at_boundary(3)
    assert (stop.checkpoint, stop.stop) == (True, True)

    restarted = PlannedInterrupt((), control=source)
    restarted.load_state_dict(guard.state_dict())
    assert not restarted.should_stop()
    again = restarted.at_boundary(4)
    assert (again.checkpoint, again.stop) == (False, False), "a resumed job does not obey the old stop again"
    assert again.control is not None
    assert again.control.stop_request == "s1"


def test_reporter_poll_control_is_the_default_source(tmp_path: Path) -> None:
    """Given a real Reporter, the guard reads the daemon's control file through its poll_control()."""
    reporter = Reporter(
        job="job",
        socket_path=tmp_path / "absent.sock",
        control_dir=tmp_path,
        background=False,
        control_interval=0,
    )
    try:
        guard = PlannedInterrupt((), reporter=reporter)
        assert not guard.at_boundary(0).stop
        write_control(control_path(tmp_path, "job"), ControlState(job="job", stop_request="s9"))
        boundary = guard.at_boundary(1)
        assert (boundary.checkpoint, boundary.stop) == (True, True)
        assert "s9" in boundary.reason
    finally:
        reporter.close()


def test_requests_and_signals_after_many_quiet_boundaries_are_still_obeyed(tmp_path: Path) -> None:
    """One process skips re-deciding an unchanged control state; anything new is still seen at once."""
    reporter = Reporter(
        job="job",
        socket_path=tmp_path / "absent.sock",
        control_dir=tmp_path,
        background=False,
        control_interval=0,
    )
    path = control_path(tmp_path, "job")
    try:
        write_control(path, ControlState(job="job", clip=ClipSettings(z_threshold=2.0)))
        guard = PlannedInterrupt((signal.SIGUSR2,), reporter=reporter).install()
        try:
            quiet = [guard.at_boundary(step) for step in range(50)]
            assert not any(b.checkpoint or b.stop for b in quiet)
            assert all(b.clip == ClipSettings(z_threshold=2.0) for b in quiet)
            write_control(path, ControlState(job="job", checkpoint_request="c1"))
            asked = guard.at_boundary(50)
            assert (asked.checkpoint, asked.stop) == (True, False)
            assert [guard.at_boundary(s).checkpoint for s in (51, 52)] == [False, False], "handled once"
            os.kill(os.getpid(), signal.SIGUSR2)
            assert guard.at_boundary(53).stop, "a signal after settled boundaries stops at the next one"
        finally:
            guard.uninstall()
        restarted = PlannedInterrupt((), reporter=reporter)
        restarted.load_state_dict({"handled": ["c1"]})
        assert not restarted.at_boundary(0).checkpoint, "c1 handled: a quiet, settled state"
        restarted.load_state_dict({"handled": []})
        assert restarted.at_boundary(1).checkpoint, "loaded state decides again: c1 is not handled there"
    finally:
        reporter.close()


def test_broken_control_source_is_counted_not_fatal(tmp_path: Path) -> None:
    """A control file that cannot be parsed keeps the last good state, is counted, and never raises."""
    path = tmp_path / "job.control.json"
    write_control(path, ControlState(job="job", checkpoint_request="c1"))
    guard = PlannedInterrupt((), control=lambda: read_control(path))
    assert guard.at_boundary(0).checkpoint
    path.write_text("{not json")
    boundary = guard.at_boundary(1)
    assert not boundary.checkpoint
    assert boundary.control is not None
    assert boundary.control.checkpoint_request == "c1"
    assert guard.control_errors == 1
    with pytest.raises(ValueError, match="handled"):
        guard.load_state_dict({"handled": [1, 2]})


def test_decisions_only_at_sync_points() -> None:
    """With sync_every=5 a signal is acted upon at the next multiple of 5, so all ranks pick the same step."""
    guard = PlannedInterrupt((signal.SIGUSR2,), sync_every=5).install()
    try:
        assert not guard.at_boundary(5).stop  # the loop is running: a signal now waits for a sync point
        os.kill(os.getpid(), signal.SIGUSR2)
        assert [guard.at_boundary(s).stop for s in (6, 7, 8, 9, 10)] == [False, False, False, False, True]
    finally:
        guard.uninstall()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Parameter digest of an uninterrupted run."""
    return baseline_sha(tmp_path_factory.mktemp("baseline"), STEPS)


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_at_the_same_step_and_resume_loses_nothing(
    tmp_path: Path, baseline: str
) -> None:
    """SIGUSR1 to rank 1 alone makes both ranks checkpoint the same step and exit 75; resuming ends
    bit-identical to an uninterrupted run."""
    ckpt, env = tmp_path / "ckpt", toy_env(tmp_path)
    args = ["--steps", str(STEPS), "--ckpt-dir", str(ckpt), "--ckpt-every", "0"]
    ranks = bare_ranks([*args, "--step-sleep", "0.1"], env)
    ranks[0].wait_for(r"^STEP 8 ")
    os.kill(ranks[1].popen.pid, signal.SIGUSR1)
    stopped = [int(r.wait_for(r"^STOPPED (\d+) ").group(1)) for r in ranks]
    codes = [r.wait() for r in ranks]
    assert codes == [EXIT_CHECKPOINTED, EXIT_CHECKPOINTED], ranks[0].output()
    assert stopped[0] == stopped[1]
    assert [p.name for p in CheckpointManager(ckpt).checkpoints()] == [f"step_{stopped[0]:010d}"]

    resume = bare_ranks([*args, "--out", str(tmp_path / "out")], env)
    assert int(resume[0].wait_for(r"^RESUMED (\d+)").group(1)) == stopped[0]
    assert [r.wait() for r in resume] == [0, 0], resume[0].output()
    assert final_sha(tmp_path / "out") == baseline


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_the_last_step_before_exit(tmp_path: Path, baseline: str) -> None:
    """SIGTERM to torchrun (as at preemption) reaches the workers, which both save the step they were on
    and stop; the resumed job starts right after it and ends bit-identical."""
    ckpt, env = tmp_path / "ckpt", toy_env(tmp_path)
    args = ["--steps", str(STEPS), "--ckpt-dir", str(ckpt), "--ckpt-every", "0"]
    run = torchrun([*args, "--step-sleep", "0.1"], env)
    run.wait_for(r"^STEP 10 ")
    run.popen.send_signal(signal.SIGTERM)
    last = int(run.wait_for(r"^STOPPED (\d+) signal SIGTERM").group(1))
    assert run.wait() != 0, "torchrun reports the signal it got"
    stops = [line for line in run.lines if line.startswith("STOPPED ")]
    assert stops == [f"STOPPED {last} signal SIGTERM"] * 2, "both workers stopped cleanly at the same step"
    assert [p.name for p in CheckpointManager(ckpt).checkpoints()] == [f"step_{last:010d}"]

    resume = torchrun([*args, "--out", str(tmp_path / "out")], env)
    assert int(resume.wait_for(r"^RESUMED (\d+)").group(1)) == last
    assert resume.wait() == 0, resume.output()
    assert final_sha(tmp_path / "out") == baseline


# Two gloo ranks; both build their PlannedInterrupt, then rank 0 constructs a CheckpointManager (whose
# process group needs every rank) while rank 1 never does: rank 0 is stuck inside __init__, in C.
STUCK_IN_SETUP = """
import os, signal, sys, time
import torch.distributed as dist
from trainwarden.client.checkpoint import CheckpointManager
from trainwarden.client.interrupt import PlannedInterrupt
dist.init_process_group("gloo")
guard = PlannedInterrupt((signal.SIGTERM,)).install()
if dist.get_rank() == 1:
    time.sleep(600)
print("ENTERING", flush=True)
CheckpointManager(sys.argv[1])
print("UNREACHED", flush=True)
"""

# Setup in Python code (loading data, say): the handler itself can run.
SLOW_PYTHON_SETUP = """
import signal, time
from trainwarden.client.interrupt import PlannedInterrupt
guard = PlannedInterrupt((signal.SIGTERM,)).install()
try:
    print("SETUP", flush=True)  # inside the try: a SIGTERM right after it must still reach `finally`
    while True:
        time.sleep(0.01)
finally:
    print("FINALLY", flush=True)
"""


# The main thread blocked in C++ for minutes: a TCPStore master waiting for a client that never comes.
BLOCKED_IN_C = """
import datetime as dt, signal, sys
import torch.distributed as dist
from trainwarden.client.interrupt import PlannedInterrupt
guard = PlannedInterrupt((signal.SIGTERM,)).install()
print("WAITING", flush=True)
dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=True, timeout=dt.timedelta(seconds=600))
print("UNREACHED", flush=True)
"""


def _listening(pid: int, port: int) -> bool:
    """The store listens on `port` (bound inside the constructor that then blocks)."""
    return any(c.laddr and c.laddr.port == port for c in psutil.Process(pid).net_connections())


def _start(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_during_python_setup_exits_75_through_finally_blocks() -> None:
    """A SIGTERM before the loop's first boundary ends the process at once with 75, running finally blocks."""
    proc = _start(SLOW_PYTHON_SETUP)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "SETUP"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == EXIT_CHECKPOINTED
    assert "FINALLY" in proc.stdout.read()


def test_sigterm_while_the_main_thread_is_blocked_in_c_exits_75_by_the_watcher() -> None:
    """Python runs no handler while C++ blocks; the wakeup-fd watcher ends the process with 75 anyway."""
    port = free_port()
    proc = _start(BLOCKED_IN_C, str(port))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "WAITING"
    wait_until(
        lambda: _listening(proc.pid, port), timeout=60, what="the store to wait for its client (in C++)"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == EXIT_CHECKPOINTED
    rest = proc.stdout.read()
    assert "main thread blocked; exiting 75" in rest
    assert "UNREACHED" not in rest


# A process in setup forks a child (as a DataLoader does) that gets a SIGTERM of its own; the parent waits
# past the watcher's grace period and must still be alive.
FORKED_CHILD_SIGNALLED = """
import os, signal, time
from trainwarden.client.interrupt import PlannedInterrupt
guard = PlannedInterrupt((signal.SIGTERM,)).install()
pid = os.fork()
if pid == 0:
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(1)  # not reached: the handler exits 75
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
time.sleep(guard.exit_grace_seconds * 2)
print("PARENT ALIVE", flush=True)
"""


def test_a_forked_childs_signal_does_not_end_its_parent() -> None:
    """A forked child's SIGTERM ends the child (75) and never wakes the parent's watcher."""
    proc = _start(FORKED_CHILD_SIGNALLED)
    assert proc.wait(60) == 0
    assert proc.stdout is not None
    assert proc.stdout.read().split("\n")[:2] == ["CHILD 75", "PARENT ALIVE"]


@pytest.mark.slow
def test_sigterm_to_a_rank_stuck_in_checkpoint_manager_init_exits_75(tmp_path: Path) -> None:
    """A rank blocked in C inside CheckpointManager.__init__ (its peer never joins) leaves with 75 on
    SIGTERM instead of waiting out torchrun's kill timeout; the other rank is not needed for that."""
    port = free_port()
    ranks = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        ranks.append(_start(STUCK_IN_SETUP, str(tmp_path / "ckpt"), env=env))
    try:
        stdout = ranks[0].stdout
        assert stdout is not None
        assert stdout.readline().strip() == "ENTERING"
        ranks[0].send_signal(signal.SIGTERM)
        assert ranks[0].wait(60) == EXIT_CHECKPOINTED
        assert "UNREACHED" not in stdout.read()
        assert ranks[1].poll() is None, "rank 1 was never signalled"
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait(30)
