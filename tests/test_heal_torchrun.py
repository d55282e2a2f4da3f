"""The `torchrun` restart backend end to end: a real `trainwarden daemon` kills the workers of a hung job and
torchrun's own elastic agent (`--max-restarts`) restarts them; the job resumes exactly. Every restart is
checked (the job must step again within a bound), and `trainwarden run` maps torchrun's status after a
SIGTERM from what the workers did."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from heal_support import TRAINWARDEN
from support import wait_until
from toy_launch import TOY, Proc, baseline_sha, final_sha, free_port, toy_env
from trainwarden.client.checkpoint import CheckpointManager
from trainwarden.client.interrupt import EXIT_CHECKPOINTED
from trainwarden.journal import JOURNAL_NAME, Entry, Journal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_torchrun_agent_restarts_the_workers_the_daemon_killed(tmp_path: Path) -> None:
    """A SIGSTOPped rank under torchrun --max-restarts 1 is detected by the daemon, whose torchrun backend
    kills the local workers; the agent restarts them, they resume, and the final parameters are exact."""
    steps = 110
    expected = baseline_sha(tmp_path / "baseline", steps)
    daemon, env = _daemon(tmp_path, cooldown=60)
    job = None
    try:
        args = ["--job", "toy", "--steps", str(steps), "--step-sleep", "0.05", "--out", str(tmp_path / "out")]
        args += ["--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "5"]
        job = Proc(_torchrun(1, args, script=TOY), env)
        job.wait_for(r"^STEP 40 ", 60)
        os.kill(_worker_pid(job, 1, script="train_toy"), signal.SIGSTOP)
        try:
            code = job.wait(60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon ---\n{daemon.output()}") from None
        assert code == 0, job.output() + "\n--- daemon ---\n" + daemon.output()
        assert any(line.startswith("RESUMED") for line in job.lines)
        assert final_sha(tmp_path / "out") == expected
        taken = [e for e in _journal(tmp_path) if e.decision == "taken"]
        assert [(e.rule, e.healer, e.result) for e in taken] == [("stall", "checkpoint_restart", "applied")]
        assert "agent" in taken[0].detail
    finally:
        for proc in (job, daemon):
            if proc is not None:
                proc.kill_group(signal.SIGKILL)


WORKER = Path(__file__).resolve().parent / "torchrun_worker.py"


def _worker_pid(job: Proc, rank: int, script: str = "torchrun_worker") -> int:
    """Pid of the torchrun worker of `rank` running `script` (not the agent, whose cmdline names it too)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(job.popen.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    cmdline = " ".join(child.cmdline())
                    worker = script in cmdline and "torch.distributed.run" not in cmdline
                    if worker and child.environ().get("RANK") == str(rank):
                        return child.pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} worker; output:\n{job.output()}")


def _torchrun(max_restarts: int, worker_args: list[str], script: Path = WORKER) -> list[str]:
    """torchrun with `max_restarts` of its own (its 0.1 s monitor interval) around `script`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.1",
        str(script),
        *worker_args,
    ]


def _daemon(tmp: Path, extra: str = "", cooldown: float = 5) -> tuple[Proc, dict[str, str]]:
    config = tmp / "config.toml"
    config.write_text(
        f"""
[daemon]
listen = "127.0.0.1:0"
runtime_dir = "{tmp / "run"}"
state_dir = "{tmp / "state"}"

[policy]
actions_enabled = true
cooldown_seconds = {cooldown}
attempts_per_rung = 1

[collectors.training]
interval_seconds = 0.5

[rules.stall]
floor_seconds = 4.0
min_samples = 10

[healers.checkpoint_restart]
backend = "torchrun"
restart_deadline_seconds = 45
{extra}
""",
        encoding="utf-8",
    )
    env = toy_env(tmp)
    env["TRAINWARDEN_SOCKET"] = str(tmp / "run" / "client.sock")
    env["TRAINWARDEN_CONTROL_DIR"] = str(tmp / "run" / "control")
    daemon = Proc([*TRAINWARDEN, "daemon", "--config", str(config)], env)
    daemon.wait_for(r"first collection done", 30)
    return daemon, env


def _status(daemon: Proc) -> dict[str, Any]:
    port = int(daemon.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", 30).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        status: dict[str, Any] = json.loads(response.read())
    return status


def _journal(tmp: Path) -> list[Entry]:
    journal = Journal(tmp / "state" / JOURNAL_NAME)
    try:
        return sorted(journal.recent(100), key=lambda e: e.id)  # in the order they were journaled
    finally:
        journal.close()


def test_attempt_store_helper_lets_torchrun_restart_the_workers_the_daemon_killed(tmp_path: Path) -> None:
    """A worker using `trainwarden.client.distributed.init_process_group` is SIGSTOPped; the daemon kills the
    workers, torchrun's agent restarts them, the new attempt's gloo group forms, the job resumes and ends
    bit-identical to an uninterrupted run, and the restart check says the job came back."""
    steps = ["--steps", "70", "--step-sleep", "0.05"]
    base_env = toy_env(tmp_path)
    baseline = Proc(
        _torchrun(0, [*steps, "--ckpt-dir", str(tmp_path / "b"), "--out", str(tmp_path / "b.sha")]), base_env
    )
    assert baseline.wait(120) == 0, baseline.output()
    daemon, env = _daemon(tmp_path)
    job = None
    try:
        args = [*steps, "--job", "mine", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "sha")]
        job = Proc(_torchrun(1, args), env)
        job.wait_for(r"^STEP 30$", 60)
        os.kill(_worker_pid(job, 1), signal.SIGSTOP)
        code = job.wait(120)
        assert code == 0, job.output() + "\n--- daemon ---\n" + daemon.output()
        assert any(line.startswith("RESUMED") for line in job.lines)
        assert (tmp_path / "sha").read_text() == (tmp_path / "b.sha").read_text()
        taken = [(e.rule, e.result) for e in _journal(tmp_path) if e.decision == "taken"]
        assert taken == [("stall", "applied")]
        back = _status(daemon)["restarts"]["jobs"]["mine"]
        assert back["state"] == "back", back
    finally:
        for proc in (job, daemon):
            if proc is not None:
                proc.kill_group(signal.SIGKILL)


def test_a_restart_whose_workers_hang_in_setup_escalates_and_says_why(tmp_path: Path) -> None:
    """Workers restarted by torchrun hang in set-up (hello, but no step): the daemon's restart check fires
    `restart_unanswered` after the bound, and the policy escalates (at most one more restart) and then gives
    up with that reason in the journal and /status, instead of staying silent or restarting every cooldown."""
    daemon, env = _daemon(tmp_path)
    job = None
    try:
        args = ["--steps", "500", "--job", "mine", "--ckpt-dir", str(tmp_path / "ckpt")]
        job = Proc(_torchrun(1, [*args, "--hang-in-setup-after-restart"]), env)
        job.wait_for(r"^STEP 30$", 60)
        os.kill(_worker_pid(job, 1), signal.SIGSTOP)
        job.wait_for(r"^SETUP_HANG", 60)

        def gave_up() -> bool:
            return any(e.decision == "gave_up" for e in _journal(tmp_path))

        try:
            wait_until(gave_up, timeout=200, what="the policy to give up on the unanswered restart")
        except AssertionError as exc:
            seen = [(e.rule, e.decision, e.result, e.detail) for e in _journal(tmp_path)]
            raise AssertionError(
                f"{exc}\njournal: {seen}\n--- daemon ---\n{daemon.output()[-6000:]}"
            ) from None
        entries = _journal(tmp_path)
        restarts = [e for e in entries if e.decision == "taken" and e.healer == "checkpoint_restart"]
        assert (restarts[0].rule, restarts[0].result) == ("stall", "applied")
        assert len(restarts) <= 2, [(e.rule, e.result, e.detail) for e in restarts]
        assert all(e.rule == "restart_unanswered" for e in restarts[1:])
        [given_up] = [e for e in entries if e.decision == "gave_up"]
        assert given_up.rule == "restart_unanswered"
        assert "job mine is not back" in given_up.reason
        assert "no step from any rank" in given_up.reason
        overdue = _status(daemon)["restarts"]["jobs"]["mine"]
        assert overdue["state"] == "overdue"
        assert overdue["deadline_seconds"] == 45
    finally:
        for proc in (job, daemon):
            if proc is not None:
                proc.kill_group(signal.SIGKILL)


def test_trainwarden_run_exits_75_when_torchrun_workers_checkpointed_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM to `trainwarden run -- torchrun …`: the workers checkpoint their step and exit 75, torchrun
    reports its own code, and the run exits 75 because every rank checkpointed after the stop."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nlisten = "127.0.0.1:0"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n[collectors.training]\ninterval_seconds = 0.5\n',
        encoding="utf-8",
    )
    env = toy_env(tmp_path)
    for name in ("TRAINWARDEN_SOCKET", "TRAINWARDEN_CONTROL_DIR"):
        env.pop(name)
    args = ["--steps", "500", "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "1000"]
    run = Proc([*TRAINWARDEN, "run", "--config", str(config), "--", *_torchrun(0, args)], env)
    try:
        run.wait_for(r"^STEP 10$", 90)
        run.popen.send_signal(signal.SIGTERM)
        code = run.wait(90)
        stops = [line for line in run.lines if line.startswith("STOPPED ")]
        assert len(stops) == 2, run.output()
        assert code == EXIT_CHECKPOINTED, run.output()
        step = int(stops[0].split()[1])
        assert [p.name for p in CheckpointManager(tmp_path / "ckpt").checkpoints()] == [f"step_{step:010d}"]
    finally:
        run.kill_group(signal.SIGKILL)
