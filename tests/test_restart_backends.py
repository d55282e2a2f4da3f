"""Restart backends on real processes: supervise (the `trainwarden run` child), torchrun's refusal without
an agent, systemd and command through the safe command runner (fake programs recording their argv)."""

from __future__ import annotations

import contextlib
import json
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest

from trainwarden.backends.base import RankProcess
from trainwarden.backends.comeback import DeadlineOptions, RestartWatch
from trainwarden.backends.command import CommandBackend
from trainwarden.backends.slurm import Scontrol
from trainwarden.backends.slurm_requeue import SlurmRequeueBackend, slurm_job_id
from trainwarden.backends.supervise import Supervisor
from trainwarden.backends.systemd import SystemdBackend
from trainwarden.backends.torchrun import TorchrunBackend
from trainwarden.daemon.timeline import EventKind, TimelineEvent
from trainwarden.healers.base import ActionOutcome
from trainwarden.model import FindingState

# A parent that starts a grandchild in a session of its own (as torchrun does with its workers),
# writes both pids and the restart count, then waits.
TREE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
out = sys.argv[1]
with open(out, "a") as f:
    f.write(f"{os.getpid()} {child.pid} {os.environ['TRAINWARDEN_RESTART_COUNT']}\\n")
time.sleep(600)
"""


def _lines(path: Path, count: int) -> list[list[str]]:
    deadline = time.monotonic() + 15
    while True:
        lines = path.read_text().split("\n") if path.exists() else []
        rows = [line.split() for line in lines if line.strip()]
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {rows} in {path}"
        time.sleep(0.02)


def test_supervise_restart_kills_the_whole_tree_and_counts_restarts(tmp_path: Path) -> None:
    """A restart kills the child and a grandchild in another session, starts the command again with
    TRAINWARDEN_RESTART_COUNT=1, and a repeated action key does not restart twice."""
    events: list[TimelineEvent] = []
    out = tmp_path / "pids"
    sup = Supervisor([sys.executable, "-c", TREE, str(out)], job="toy", on_event=events.append)
    sup.start()
    try:
        parent, grandchild, count = _lines(out, 1)[0]
        assert count == "0"
        result = sup.restart("toy", "test", key="k1")
        assert result.outcome is ActionOutcome.APPLIED, result.detail
        assert result.data["killed"] == 2
        assert not psutil.pid_exists(int(grandchild)) or psutil.Process(int(grandchild)).status() == "zombie"
        assert not psutil.pid_exists(int(parent))
        assert sup.retired(int(parent))
        assert sup.retired(int(grandchild))
        assert _lines(out, 2)[1][2] == "1"
        again = sup.restart("toy", "test", key="k1")
        assert again.outcome is ActionOutcome.NOOP
        assert sup.generation == 2
        assert [e.kind for e in events] == [EventKind.CHILD_STARTED, EventKind.CHILD_STARTED]
    finally:
        sup.stop()
    for _parent, grandchild, _count in _lines(out, 2):
        assert not psutil.pid_exists(int(grandchild)) or psutil.Process(int(grandchild)).status() == "zombie"


def test_supervise_wait_reports_only_the_jobs_own_exit() -> None:
    """wait() gives the child's own exit status and nothing for a child that a restart replaced."""
    sup = Supervisor([sys.executable, "-c", "import sys; sys.exit(3)"], job="j")
    sup.start()
    deadline = time.monotonic() + 15
    code = None
    while code is None and time.monotonic() < deadline:
        code = sup.wait(0.5)
    assert code == 3
    killed = Supervisor([sys.executable, "-c", "import time; time.sleep(60)"], job="j")
    killed.start()
    try:
        first = killed.pid
        assert killed.restart("j", "test", key="a").outcome is ActionOutcome.APPLIED
        assert killed.pid != first
        assert killed.wait(0.2) is None  # the replaced child's SIGKILL is not the job's exit
        assert killed.running()
    finally:
        killed.stop()
    assert killed.wait(0.2) is None


def test_supervise_refuses_another_job_and_dry_run_touches_nothing() -> None:
    """A finding about a job this run does not supervise fails; a dry run keeps the child running."""
    sup = Supervisor([sys.executable, "-c", "import time; time.sleep(60)"], job="mine")
    sup.start()
    try:
        pid = sup.pid
        assert sup.restart("other", "x", key="1").outcome is ActionOutcome.FAILED
        assert sup.restart("mine", "x", key="2", dry_run=True).outcome is ActionOutcome.DRY_RUN
        assert sup.pid == pid
        assert sup.running()
    finally:
        sup.stop()


def test_torchrun_backend_refuses_workers_without_an_agent() -> None:
    """A worker no torchrun agent watches is not killed (nothing would restart it): refused."""
    proc = psutil.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        backend = TorchrunBackend(lambda job: [RankProcess(job, 0, 0, proc.pid)])
        result = backend.restart("toy", "hang", key="k")
        assert result.outcome is ActionOutcome.FAILED
        assert result.data["refused"] == "no_agent"
        assert proc.is_running()
        none = TorchrunBackend(lambda job: [])
        assert none.restart("toy", "hang", key="k").outcome is ActionOutcome.NOOP
    finally:
        proc.kill()
        proc.wait(10)


# An agent-like parent (its command line names torch.distributed.run, as torchrun's does) that restarts
# its worker whenever it dies and appends each worker's pid to argv[1].
AGENT = """
import subprocess, sys, time
while True:
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(sys.argv[1], "a") as f:
        f.write(f"{worker.pid}\\n")
    worker.wait()
"""


def test_torchrun_backend_kills_the_remembered_agents_workers_when_none_said_hello(tmp_path: Path) -> None:
    """After a restart the agent's new workers may hang before any hello: a second restart of the job kills
    the workers that agent runs now instead of finding nothing to kill."""
    out = tmp_path / "workers"
    agent = psutil.Popen([sys.executable, "-c", AGENT, str(out), "torch.distributed.run"])
    try:
        first = int(_lines(out, 1)[0][0])
        known = [RankProcess("toy", 0, 0, first)]
        backend = TorchrunBackend(lambda job: list(known))
        result = backend.restart("toy", "hang", key="k1")
        assert result.outcome is ActionOutcome.APPLIED, result.detail
        assert f"agent(s) [{agent.pid}]" in result.detail
        second = int(_lines(out, 2)[1][0])
        known.clear()  # the daemon forgot the old ranks; the new worker never said hello
        again = backend.restart("toy", "restart_unanswered", key="k2")
        assert again.outcome is ActionOutcome.APPLIED, again.detail
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
        assert int(_lines(out, 3)[2][0]) not in {first, second}
    finally:
        agent.kill()
        agent.wait(10)
        for row in _lines(out, 1):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(row[0])).kill()


def _recorder(tmp_path: Path, name: str, exit_code: int = 0) -> tuple[Path, Path]:
    record = tmp_path / f"{name}.args"
    program = tmp_path / name
    program.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"sys.exit({exit_code})\n",
        encoding="utf-8",
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return program, record


def test_systemd_backend_runs_systemctl_restart_unit(tmp_path: Path) -> None:
    """`systemctl restart UNIT` is run as an argument list; a failing systemctl is a failed restart."""
    program, record = _recorder(tmp_path, "systemctl")
    backend = SystemdBackend("train.service", program=str(program))
    assert backend.restart("toy", "hang", key="1").outcome is ActionOutcome.APPLIED
    assert json.loads(record.read_text()) == ["restart", "train.service"]
    failing, _ = _recorder(tmp_path, "systemctl-bad", exit_code=5)
    bad = SystemdBackend("train.service", program=str(failing))
    assert bad.restart("toy", "hang", key="1").outcome is ActionOutcome.FAILED
    assert {s.label("result") for s in bad.samples()} == {"failed"}
    with pytest.raises(ValueError, match="unit name"):
        SystemdBackend("--now; reboot")


def test_command_backend_fills_placeholders_as_single_arguments(tmp_path: Path) -> None:
    """{job} and {reason} become one argument each (shell text stays inert); a bad job name runs nothing."""
    program, record = _recorder(tmp_path, "restart-job")
    backend = CommandBackend([str(program), "--job", "{job}", "{reason}"])
    result = backend.restart("toy", "stall; rm -rf / $(id)", key="1")
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    args = json.loads(record.read_text())
    assert args[:2] == ["--job", "toy"]
    assert len(args) == 3
    refused = backend.restart("../etc", "x", key="2")
    assert refused.outcome is ActionOutcome.FAILED
    assert len(record.read_text().splitlines()) == 1


def test_exit_status_of_a_signalled_child() -> None:
    """A child killed by a signal reports 128+N, like a shell."""
    sup = Supervisor(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], job="j"
    )
    sup.start()
    code = None
    deadline = time.monotonic() + 15
    while code is None and time.monotonic() < deadline:
        code = sup.wait(0.5)
    assert code == 128 + 15


def test_slurm_backend_needs_a_job_id() -> None:
    """The Slurm job id comes from the config or a job named slurm-<id>; without one nothing is requeued."""
    assert slurm_job_id("slurm-1234") == "1234"
    assert slurm_job_id("toy", "77") == "77"
    assert slurm_job_id("toy") == ""
    result = SlurmRequeueBackend(Scontrol(program="/nonexistent/scontrol")).restart("toy", "hang", key="k")
    assert result.outcome is ActionOutcome.FAILED
    assert "no Slurm job id" in result.detail


def test_restart_watch_fires_when_the_job_is_not_back_and_resolves_when_it_is() -> None:
    """A restart opens an expectation: no step after it within the bound is a firing finding naming why;
    a later step resolves it and teaches the start-up time, which sets the next bound (factor x, floor)."""
    watch = RestartWatch(DeadlineOptions(floor_seconds=10.0, factor=3.0))
    stepped: dict[str, float] = {"mine": 95.0}  # a step from before the restart
    watch.expect("mine", 100.0, action_key="k1", healer="checkpoint_restart")
    assert watch.check(105.0, stepped.get) == []
    assert watch.status()["jobs"]["mine"]["state"] == "waiting"
    [fired] = watch.check(111.0, stepped.get)
    assert (fired.rule, fired.state, fired.subject) == (
        "restart_unanswered",
        FindingState.FIRING,
        {"job": "mine"},
    )
    assert "not back 11s after checkpoint_restart restarted it" in fired.summary
    assert fired.evidence["after_action"] == "k1"
    [again] = watch.check(112.0, stepped.get)
    assert again.since == fired.since, "one episode: the same finding key every tick"
    assert watch.status()["jobs"]["mine"]["state"] == "overdue"
    stepped["mine"] = 114.0
    [resolved] = watch.check(115.0, stepped.get)
    assert resolved.state is FindingState.RESOLVED
    assert watch.status()["jobs"]["mine"] == {
        "state": "back",
        "restarted_at": 100.0,
        "deadline_seconds": 10.0,
        "seconds": 14.0,
        "action": "k1",
    }
    assert watch.check(200.0, stepped.get) == []
    assert watch.deadline_for("mine") == 42.0
    assert watch.deadline_for("other") == 10.0
    assert RestartWatch(DeadlineOptions(fixed_seconds=5.0)).deadline_for("mine") == 5.0
    assert not watch.knows_startup("first")
    watch.observe_startup("first", 50.0)  # trainwarden run: the child's start to its first step
    assert watch.knows_startup("first")
    assert watch.deadline_for("first") == 150.0


def test_restart_watch_is_quiet_for_a_job_back_in_time() -> None:
    """A job whose first step after the restart arrives within the bound raises nothing at all."""
    watch = RestartWatch(DeadlineOptions(floor_seconds=10.0))
    watch.expect("mine", 100.0, action_key="k1", healer="checkpoint_restart")
    assert watch.check(104.0, {"mine": 103.0}.get) == []
    assert watch.check(500.0, {"mine": 103.0}.get) == []
    assert watch.status()["jobs"]["mine"]["state"] == "back"
