"""Reload inside one daemon: each section the file changes is rebuilt and swapped in, the others keep
their running state, and restart-only settings are kept and warned about."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainwarden.daemon.app import Daemon, Overrides, load

HOST = Path(__file__).parent / "fixtures" / "hosts" / "vm_psi"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Daemon]:
    config_path = tmp_path / "config.toml"
    config_path.write_text("[policy]\nactions_enabled = true\n")
    overrides = Overrides(
        listen="127.0.0.1:0",
        runtime_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        procfs=HOST / "proc",
        sysfs=HOST / "sys",
    )
    daemon = Daemon(load(config_path, overrides), config_path=config_path, overrides=overrides)
    daemon.start()
    yield daemon
    daemon.stop()


def _write(daemon: Daemon, text: str) -> None:
    assert daemon.config_path is not None
    daemon.config_path.write_text(text)


def test_a_collector_only_change_keeps_the_rule_engine_and_the_policy(running: Daemon) -> None:
    """Retuning a collector restarts the collectors but keeps the engine's pending findings and the policy."""
    healing = running.healing
    assert healing is not None
    engine, policy = healing.engine, healing.policy
    _write(running, "[policy]\nactions_enabled = true\n[collectors.cpu]\ninterval_seconds = 2.5\n")
    assert running.reload()
    assert healing.engine is engine
    assert healing.policy is policy
    options = running.config.plugin("collectors", "cpu")
    assert getattr(options, "interval_seconds", None) == pytest.approx(2.5)


def test_rules_policy_and_healers_changes_are_all_applied(running: Daemon) -> None:
    """One reload that retunes a rule, a healer and the policy swaps in all three, visible in /status."""
    healing = running.healing
    assert healing is not None
    engine = healing.engine
    _write(
        running,
        "[policy]\nactions_enabled = false\ncooldown_seconds = 300\n"
        "[rules.stall]\nfloor_seconds = 45\n"
        "[healers.clip]\ntighten_factor = 0.5\n",
    )
    assert running.reload()
    assert healing.engine is not engine
    assert healing.policy.dry_run
    assert healing.policy.config.cooldown_seconds == pytest.approx(300.0)
    assert getattr(healing.healers["clip"].options, "tighten_factor", None) == pytest.approx(0.5)
    assert running.status()["policy"]["actions_enabled"] is False


def test_a_refused_reload_changes_nothing(running: Daemon) -> None:
    """A file with one bad key among good changes is refused whole: no section of it is applied."""
    healing = running.healing
    assert healing is not None
    policy, engine = healing.policy, healing.engine
    _write(running, "[policy]\nactions_enabled = false\n[rules.stall]\nfloor_seconds = nan\n")
    assert not running.reload()
    assert healing.policy is policy
    assert healing.engine is engine
    assert not policy.dry_run
    assert running.status()["config"]["last_reload"]["ok"] is False


def test_restart_only_settings_are_kept_and_warned_about(
    running: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """node_name and [webhook] changed by a reload are logged as needing a restart and stay as they were."""
    before = running.config
    _write(
        running,
        "[policy]\nactions_enabled = true\n[daemon]\nnode_name = 'other'\n[webhook]\nmax_alerts = 7\n",
    )
    with caplog.at_level(logging.WARNING, logger="trainwarden"):
        assert running.reload()
    assert running.config.daemon.node_name == before.daemon.node_name
    assert running.config.webhook == before.webhook
    assert "daemon.node_name changed; it takes effect only after a restart" in caplog.text
    assert "[webhook] changed; it takes effect only after a restart" in caplog.text
