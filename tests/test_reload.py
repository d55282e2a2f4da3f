"""SIGHUP on the real `trainwarden daemon`: a reload applies every section it accepts ([policy] included)
or refuses the whole file and keeps monitoring and healing on the running config."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest

from daemon_support import Running, start_daemon, stop
from support import wait_until
from trainwarden.client.reporter import Reporter
from trainwarden.protocol import default_control_dir, default_socket_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOUCH = "/usr/bin/touch"


def _config(tmp_path: Path, *, actions_enabled: bool, extra: str = "") -> str:
    """Actions restart a job by touching `restarted-JOB`: a side effect the test can see on disk."""
    return f"""
[policy]
actions_enabled = {str(actions_enabled).lower()}
cooldown_seconds = 1

[collectors.training]
interval_seconds = 0.2

[healers.checkpoint_restart]
backend = "command"
command_argv = ["{TOUCH}", "{tmp_path}/restarted-{{job}}"]
{extra}
"""


def _nan_step(running: Running, job: str) -> None:
    """One rank of `job` reports a NaN loss through the documented client, as a diverged job would."""
    reporter = Reporter(
        job,
        default_socket_path(running.config.parent / "run"),
        control_dir=default_control_dir(running.config.parent / "run"),
        background=False,
        stack_dump=False,
    )
    try:
        reporter.step(1, loss=1.0, grad_norm=1.0)
        reporter.step(2, loss=math.nan, grad_norm=1.0)
        assert reporter.flush(5.0), "the daemon did not take the records"
    finally:
        reporter.close()


def _counter(running: Running, name: str, **labels: str) -> float:
    return running.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def _hup(running: Running, result: str) -> None:
    """Send SIGHUP and wait until the reload was counted with `result`."""
    before = _counter(running, "trainwarden_config_reloads_total", result=result)
    running.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: _counter(running, "trainwarden_config_reloads_total", result=result) > before,
        30.0,
        f"reload counted as {result}",
    )


@pytest.fixture
def acting(tmp_path: Path) -> Running:
    running = start_daemon(tmp_path, _config(tmp_path, actions_enabled=True))
    assert Path(TOUCH).exists()
    yield running  # type: ignore[misc]
    stop(running)


def test_reload_turning_actions_off_is_obeyed_at_once(acting: Running, tmp_path: Path) -> None:
    """Started acting (a NaN restarts the job), reloaded with actions_enabled = false, the next NaN is only
    a dry run: nothing is restarted, and metrics and /status say actions are off."""
    _nan_step(acting, "alpha")
    wait_until((tmp_path / "restarted-alpha").exists, 60.0, "the acting daemon to restart alpha")
    applied = {"healer": "checkpoint_restart", "result": "applied"}
    wait_until(lambda: _counter(acting, "trainwarden_actions_total", **applied) == 1, 30.0, "the count")

    acting.config.write_text(_config(tmp_path, actions_enabled=False))
    _hup(acting, "success")
    status = acting.status()
    assert status["policy"]["actions_enabled"] is False  # type: ignore[index]
    wait_until(lambda: _counter(acting, "trainwarden_policy_actions_enabled") == 0, 30.0, "the next tick")
    assert status["config"]["last_reload"]["ok"] is True  # type: ignore[index]

    _nan_step(acting, "beta")
    dry_runs = {"healer": "checkpoint_restart", "result": "dry_run"}
    wait_until(lambda: _counter(acting, "trainwarden_actions_total", **dry_runs) >= 1, 60.0, "a dry run")
    assert not (tmp_path / "restarted-beta").exists()
    # the counter carried over the reload instead of resetting to 0
    assert _counter(acting, "trainwarden_actions_total", **applied) == 1
    assert "actions disabled (dry run)" in acting.log.read_text()


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("[collectors.cpu]\ninterval_seconds = nan\n", "[collectors.cpu] interval_seconds: must be finite"),
        ("x = " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
        ("[policy.routes]\nnonfinite = ['no_such_healer']\n", "unknown healer 'no_such_healer'"),
        ("[daemon]\nlisten = '127.0.0.1:9871:1'\n", "[daemon] listen: expected HOST:PORT"),
    ],
    ids=["nan-interval", "nesting-bomb", "unknown-healer", "listen-three-parts"],
)
def test_a_rejected_reload_keeps_monitoring_and_healing_on_the_old_config(
    acting: Running, tmp_path: Path, bad: str, why: str
) -> None:
    """A file that would once have killed the daemon or half-applied is refused whole: the daemon stays up
    and healthy, counts and logs the rejection with its reason, and keeps acting on the running config."""
    good = acting.config.read_text()
    acting.config.write_text(good.replace("actions_enabled = true", "actions_enabled = false") + bad)
    _hup(acting, "failure")
    assert acting.proc.poll() is None
    assert acting.healthy()
    assert _counter(acting, "trainwarden_config_last_reload_successful") == 0
    assert why in acting.status()["config"]["last_reload"]["error"]  # type: ignore[index]
    assert _counter(acting, "trainwarden_policy_actions_enabled") == 1  # the [policy] of the refused file
    assert "config reload rejected, keeping the running config" in acting.log.read_text()
    assert "Traceback" not in acting.log.read_text()

    _nan_step(acting, "gamma")
    wait_until((tmp_path / "restarted-gamma").exists, 60.0, "the old config to keep healing")


def test_a_fifo_in_place_of_the_config_is_refused_without_blocking(acting: Running) -> None:
    """Replacing the config file by a FIFO and sending SIGHUP neither blocks nor kills the daemon."""
    acting.config.unlink()
    os.mkfifo(acting.config)
    _hup(acting, "failure")
    assert "not a regular file" in acting.status()["config"]["last_reload"]["error"]  # type: ignore[index]
    assert acting.healthy()
