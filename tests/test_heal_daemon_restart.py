"""A daemon killed in the middle of a restart action, and started again on the same state directory, does
not repeat the action: real `trainwarden daemon` processes, a real torchrun job, a slow restart command."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from heal_support import TRAINWARDEN
from toy_launch import Proc, torchrun, toy_env
from trainwarden.journal import JOURNAL_NAME, Entry, Journal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SLOW_RESTART = """#!{python}
import os, sys, time
with open({record!r}, "a") as f:
    f.write(f"{{os.getpid()}} {{sys.argv[1]}}\\n")
time.sleep(60)
"""


def _config(tmp: Path, script: Path) -> Path:
    config = tmp / "config.toml"
    config.write_text(
        f"""
[daemon]
listen = "127.0.0.1:0"
runtime_dir = "{tmp / "run"}"
state_dir = "{tmp / "state"}"

[policy]
actions_enabled = true
cooldown_seconds = 60

[collectors.training]
interval_seconds = 0.5

[rules.stall]
floor_seconds = 3.0
min_samples = 10
default_timeout_seconds = 3.0

[healers.checkpoint_restart]
backend = "command"
command_argv = ["{script}", "{{job}}"]
""",
        encoding="utf-8",
    )
    return config


def _journal(tmp: Path) -> list[Entry]:
    journal = Journal(tmp / "state" / JOURNAL_NAME)
    try:
        return journal.recent(200)
    finally:
        journal.close()


def _wait(what: str, check: Callable[[], object], timeout: float = 40.0, log: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n" + (log.output() if log else "")
        time.sleep(0.2)


def test_daemon_restarted_mid_action_does_not_repeat_it(tmp_path: Path) -> None:
    """Daemon 1 sees a job's NaN loss and starts a slow restart; killed mid-action and replaced by daemon 2
    on the same state dir, the still-bad job is refused as in progress (the journaled pending action):
    one restart command."""
    record = tmp_path / "restart-calls"
    script = tmp_path / "restart-job"
    script.write_text(SLOW_RESTART.format(python=sys.executable, record=str(record)), encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    config = _config(tmp_path, script)
    daemon_cmd = [*TRAINWARDEN, "daemon", "--config", str(config)]
    env = toy_env(tmp_path)
    env["TRAINWARDEN_SOCKET"] = str(tmp_path / "run" / "client.sock")
    env["TRAINWARDEN_CONTROL_DIR"] = str(tmp_path / "run" / "control")
    first = Proc(daemon_cmd, env)
    second: Proc | None = None
    job = None
    try:
        first.wait_for(r"first collection done", 30)
        # NaN, not a hang: a hung rank sends nothing, so it would never reconnect to daemon 2
        job = torchrun(
            ["--job", "toy", "--steps", "100000", "--step-sleep", "0.05", "--nan-at-step", "30"], env
        )
        _wait("the restart command to start", lambda: record.exists() and record.read_text().strip(), 60, job)
        first.kill_group(signal.SIGKILL)  # mid-action: the journal holds the decision, not its result
        first.wait(10)
        pending = [e for e in _journal(tmp_path) if e.decision == "taken"]
        assert [(e.healer, e.result) for e in pending] == [("checkpoint_restart", "pending")]

        second = Proc(daemon_cmd, env)

        def refused() -> bool:
            return any(e.result == "in_progress" for e in _journal(tmp_path))

        _wait("daemon 2 to see the still-bad job and refuse it as in progress", refused, 60, second)
        entries = _journal(tmp_path)
        assert len([e for e in entries if e.decision == "taken"]) == 1
        assert len(record.read_text().splitlines()) == 1
    finally:
        for proc in (second, first, job):
            if proc is not None:
                proc.kill_group(signal.SIGKILL)
        if record.exists():
            for line in record.read_text().splitlines():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[0]), signal.SIGKILL)
