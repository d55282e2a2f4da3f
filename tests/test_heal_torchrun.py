"""The `torchrun` restart backend end to end: a real `trainwarden daemon` kills the workers of a hung job and
torchrun's own elastic agent (`--max-restarts`) restarts them; the job resumes exactly."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from heal_support import TRAINWARDEN
from toy_launch import TOY, Proc, baseline_sha, final_sha, free_port, toy_env
from trainwarden.journal import JOURNAL_NAME, Journal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def _worker(job: Proc, rank: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(job.popen.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if "train_toy" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                    return child.pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} worker; output:\n{job.output()}")


def test_torchrun_agent_restarts_the_workers_the_daemon_killed(tmp_path: Path) -> None:
    """A SIGSTOPped rank under torchrun --max-restarts 1 is detected by the daemon, whose torchrun backend
    kills the local workers; the agent restarts them, they resume, and the final parameters are exact."""
    steps = 110
    expected = baseline_sha(tmp_path / "baseline", steps)
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[daemon]
listen = "127.0.0.1:0"
runtime_dir = "{tmp_path / "run"}"
state_dir = "{tmp_path / "state"}"

[policy]
actions_enabled = true
cooldown_seconds = 60

[collectors.training]
interval_seconds = 0.5

[rules.stall]
floor_seconds = 4.0
min_samples = 10

[healers.checkpoint_restart]
backend = "torchrun"
""",
        encoding="utf-8",
    )
    env = toy_env(tmp_path)
    env["TRAINWARDEN_SOCKET"] = str(tmp_path / "run" / "client.sock")
    env["TRAINWARDEN_CONTROL_DIR"] = str(tmp_path / "run" / "control")
    daemon = Proc([*TRAINWARDEN, "daemon", "--config", str(config)], env)
    job = None
    try:
        daemon.wait_for(r"first collection done", 30)
        cmd = [
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
            "1",
            "--monitor-interval",
            "0.1",
            str(TOY),
            "--job",
            "toy",
            "--steps",
            str(steps),
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--ckpt-every",
            "5",
            "--step-sleep",
            "0.05",
            "--out",
            str(tmp_path / "out"),
        ]
        job = Proc(cmd, env)
        job.wait_for(r"^STEP 40 ", 60)
        os.kill(_worker(job, 1), signal.SIGSTOP)
        try:
            code = job.wait(60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon ---\n{daemon.output()}") from None
        assert code == 0, job.output() + "\n--- daemon ---\n" + daemon.output()
        assert any(line.startswith("RESUMED") for line in job.lines)
        assert final_sha(tmp_path / "out") == expected
        journal = Journal(tmp_path / "state" / JOURNAL_NAME)
        taken = [e for e in journal.recent(50) if e.decision == "taken"]
        journal.close()
        assert [(e.rule, e.healer, e.result) for e in taken] == [("stall", "checkpoint_restart", "applied")]
        assert "agent" in taken[0].detail
    finally:
        for proc in (job, daemon):
            if proc is not None:
                proc.kill_group(signal.SIGKILL)
