"""`trainwarden run` and `trainwarden actions` without torch: plain child processes under the real daemon."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from trainwarden.config import Config, config_from_dict
from trainwarden.daemon.app import Daemon
from trainwarden.daemon.cli import main
from trainwarden.daemon.run_cli import private_dirs, run_job
from trainwarden.daemon.timeline import EventKind, TimelineEvent
from trainwarden.journal import Journal
from trainwarden.plugins import plugin_groups

pytestmark = pytest.mark.timeout(60)

FLAKY = """
import os, sys
count = int(os.environ["TRAINWARDEN_RESTART_COUNT"])
with open(sys.argv[1], "a") as f:
    names = ("TRAINWARDEN_JOB", "TRAINWARDEN_SOCKET", "TRAINWARDEN_RESTART_COUNT")
    f.write(" ".join(os.environ[k] for k in names))
    f.write("\\n")
sys.exit(0 if count >= int(sys.argv[2]) else 3)
"""


def _config(tmp: Path, **policy: Any) -> Config:
    data: dict[str, Any] = {
        "daemon": {"listen": "127.0.0.1:0", "runtime_dir": str(tmp / "run"), "state_dir": str(tmp / "state")},
        "policy": {"cooldown_seconds": 1.0, **policy},
        "collectors": {"training": {"interval_seconds": 0.5}},
    }
    return config_from_dict(data, plugin_groups())


def test_observe_only_run_does_not_restart_and_returns_the_jobs_status(tmp_path: Path) -> None:
    """Without actions enabled a crash is journaled as a dry run and the run exits with the job's status."""
    record = tmp_path / "runs"
    events: list[TimelineEvent] = []
    code = run_job(
        _config(tmp_path),
        [sys.executable, "-c", FLAKY, str(record), "1"],
        job="flaky",
        on_event=events.append,
    )
    assert code == 3
    assert len(record.read_text().splitlines()) == 1
    kinds = [e.kind for e in events]
    assert kinds[:2] == [EventKind.CHILD_STARTED, EventKind.CHILD_EXITED]
    assert EventKind.GAVE_UP in kinds
    entries = Journal(tmp_path / "state" / "journal.sqlite3").recent(10)
    assert [(e.rule, e.healer, e.result, e.dry_run) for e in entries] == [
        ("process_exit", "checkpoint_restart", "dry_run", True)
    ]


def test_enabled_run_restarts_a_crash_with_the_daemons_environment(tmp_path: Path) -> None:
    """With actions enabled a crashed job is restarted with TRAINWARDEN_RESTART_COUNT raised, and the
    daemon's socket and the job name in its environment; the run exits 0 when the job does."""
    record = tmp_path / "runs"
    events: list[TimelineEvent] = []
    config = _config(tmp_path, actions_enabled=True)
    code = run_job(
        config, [sys.executable, "-c", FLAKY, str(record), "1"], job="flaky", on_event=events.append
    )
    assert code == 0
    runs = [line.split() for line in record.read_text().splitlines()]
    assert [r[2] for r in runs] == ["0", "1"]
    assert runs[0][:2] == ["flaky", str(tmp_path / "run" / "client.sock")]
    applied = [e for e in events if e.kind is EventKind.ACTION_APPLIED]
    assert [(e.rule, e.healer) for e in applied] == [("process_exit", "checkpoint_restart")]


def test_enabled_run_gives_up_when_the_ladder_is_spent(tmp_path: Path) -> None:
    """A job that always fails is restarted attempts_per_rung times, then the run gives up with its status."""
    record = tmp_path / "runs"
    config = _config(tmp_path, actions_enabled=True, attempts_per_rung=2)
    code = run_job(config, [sys.executable, "-c", FLAKY, str(record), "99"], job="flaky")
    assert code == 3
    assert len(record.read_text().splitlines()) == 3


def test_cli_run_needs_a_command_and_actions_prints_the_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` without a command is a usage error; `actions --json` prints journaled decisions as JSON lines."""
    assert main(["run", "--state-dir", str(tmp_path)]) == 2
    assert main(["actions", "--state-dir", str(tmp_path / "none")]) == 1
    run_job(_config(tmp_path), [sys.executable, "-c", "raise SystemExit(4)"], job="j")
    capsys.readouterr()
    assert main(["actions", "--state-dir", str(tmp_path / "state"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["rule"], d["result"]) for d in lines] == [("process_exit", "dry_run")]
    assert main(["actions", "--state-dir", str(tmp_path / "state"), "--limit", "5"]) == 0
    assert "process_exit" in capsys.readouterr().out


def test_run_falls_back_to_private_dirs_only_when_needed(tmp_path: Path) -> None:
    """Writable configured dirs are kept; an unwritable runtime dir is replaced by a fresh private one."""
    config = _config(tmp_path)
    assert private_dirs(config) == config
    blocked = tmp_path / "file"
    blocked.write_text("", encoding="utf-8")
    data: dict[str, Any] = {"daemon": {"runtime_dir": str(blocked / "run"), "state_dir": str(tmp_path / "s")}}
    moved = private_dirs(config_from_dict(data, plugin_groups()))
    assert moved.daemon.runtime_dir.name.startswith("trainwarden-run-")
    assert moved.daemon.runtime_dir.is_dir()
    assert moved.daemon.state_dir == tmp_path / "s"
    moved.daemon.runtime_dir.rmdir()


def test_daemon_status_carries_rules_and_policy(tmp_path: Path) -> None:
    """A started daemon ticks detect-and-heal and shows the engine's and the policy's state in /status."""
    daemon = Daemon(_config(tmp_path))
    daemon.start()
    try:
        status = daemon.status()
    finally:
        daemon.stop()
    assert "stall" in status["rules"]["rules"]
    assert status["policy"]["actions_enabled"] is False
    assert "checkpoint_restart" in status["policy"]["healers"]


# A job that names itself (not the name `trainwarden run` gave it), steps, hangs in its first run and
# finishes in its second.
SELF_NAMED = """
import os, sys, time
from trainwarden.client.reporter import Reporter
restarts = int(os.environ["TRAINWARDEN_RESTART_COUNT"])
reporter = Reporter.from_env(job="mine")
for step in range(30):
    time.sleep(0.05)
    reporter.step(step, loss=1.0)
    if restarts == 0 and step == 20:
        time.sleep(600)
reporter.close()
"""


def test_a_hang_in_a_job_that_names_itself_is_restarted(tmp_path: Path) -> None:
    """`Reporter.from_env(job="mine")` under `trainwarden run` without `--job`: its hang is restarted (its
    ranks descend from the supervised child), and the run ends with the job's own exit 0."""
    data: dict[str, Any] = {
        "daemon": {
            "listen": "127.0.0.1:0",
            "runtime_dir": str(tmp_path / "run"),
            "state_dir": str(tmp_path / "s"),
        },
        # a cooldown above the stall rule's resolve_after_seconds, as docs/HEALING.md asks
        "policy": {"cooldown_seconds": 30.0, "actions_enabled": True},
        "collectors": {"training": {"interval_seconds": 0.5}},
        "rules": {"stall": {"floor_seconds": 2.0, "min_samples": 5}},
    }
    events: list[TimelineEvent] = []
    code = run_job(
        config_from_dict(data, plugin_groups()), [sys.executable, "-c", SELF_NAMED], on_event=events.append
    )
    assert code == 0, [e.line() for e in events]
    entries = Journal(tmp_path / "s" / "journal.sqlite3").recent(20)
    taken = [(e.rule, e.subject, e.result) for e in entries if e.decision == "taken"]
    assert taken == [("stall", "job=mine,rank=0", "applied")]
    started = [e for e in events if e.kind is EventKind.CHILD_STARTED]
    assert len(started) == 2
