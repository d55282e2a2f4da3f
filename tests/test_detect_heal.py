"""Detect and heal through real parts: client records over the training socket -> store -> rules -> policy
-> clip healer -> the control file the training job reads; and a daemon restart mid-incident."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from training_support import connect, hello, received, running_collector, send, wait_until
from trainwarden.collectors.training import TrainingCollector
from trainwarden.config import Config, config_from_dict
from trainwarden.daemon.exporter import make_registry
from trainwarden.healers.policy import Policy
from trainwarden.journal import Journal
from trainwarden.plugins import plugin_groups
from trainwarden.rules.engine import RuleEngine
from trainwarden.store import Store


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path) -> Config:
    data: dict[str, Any] = {
        "daemon": {"runtime_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state")},
        # clipping changes the training: opted into here, as a user would
        "policy": {"actions_enabled": True, "cooldown_seconds": 60, "routes": {"spike": ["clip"]}},
    }
    return config_from_dict(data, plugin_groups())


def _step(i: int, grad_norm: float) -> dict[str, Any]:
    return {"type": "step", "step": i, "step_seconds": 1.0, "loss": 2.0, "grad_norm": grad_norm}


def _collect(collector: TrainingCollector, store: Store, now: float) -> None:
    store.replace("training", collector.collect(), now)


def _feed(
    collector: TrainingCollector, clock: Clock, sock: Any, steps: range, spike_at: int | None = None
) -> None:
    for i in steps:
        clock.now = 1000.0 + i
        grad_norm = 40.0 if i == spike_at else 1.0 + 0.02 * ((i * 7) % 5 - 2)
        before = received(collector)
        send(sock, _step(i, grad_norm))
        wait_until(lambda b=before: received(collector) > b, what=f"step {i}")


@pytest.mark.timeout(60)
def test_spike_tightens_clipping_end_to_end_and_restart_does_not_repeat(tmp_path: Path) -> None:
    """A grad-norm spike sent by a rank is detected and clipping is tightened in the job's control file,
    visible in metrics; a fresh engine and policy on the same state dir (a restart) do not clip again on
    the same spike."""
    config = _config(tmp_path)
    clock = Clock(1000.0)
    with running_collector(tmp_path / "run", clock=clock) as collector:
        sock = connect(collector)
        send(sock, hello(0, world_size=1))
        wait_until(lambda: received(collector) == 1, what="hello")
        _feed(collector, clock, sock, range(60))
        store = Store()
        engine, policy = RuleEngine.from_config(config, store), Policy.from_config(config, store)
        _collect(collector, store, clock.now)
        assert policy.tick(clock.now, engine.tick(clock.now)) == []  # healthy: nothing to do

        _feed(collector, clock, sock, range(60, 62), spike_at=60)
        _collect(collector, store, clock.now)
        outcomes = policy.tick(clock.now, engine.tick(clock.now))
        assert [(o.finding.rule, o.healer, o.result) for o in outcomes] == [("spike", "clip", "applied")]
        control = collector.read_control("toy")
        assert control is not None
        assert control.clip is not None
        assert control.clip.z_threshold == pytest.approx(2.0)
        registry = make_registry(store)
        assert (
            registry.get_sample_value("trainwarden_actions_total", {"healer": "clip", "result": "applied"})
            == 1
        )
        active = {"rule": "spike", "subject": "job=toy"}
        assert registry.get_sample_value("trainwarden_rule_active", active) == 1

        # restart mid-incident: fresh engine and policy (their in-memory state is gone, the finding
        # re-fires with a new `since`); the journal in the state dir is all that carries over
        engine2, policy2 = RuleEngine.from_config(config, store), Policy.from_config(config, store)
        clock.now += 5
        _collect(collector, store, clock.now)
        again = policy2.tick(clock.now, engine2.tick(clock.now))
        assert [(o.healer, o.result) for o in again] == [("clip", "in_progress")]
        control = collector.read_control("toy")
        assert control is not None
        assert control.clip is not None
        assert control.clip.z_threshold == pytest.approx(2.0)
        sock.close()
    entries = Journal.in_state_dir(tmp_path / "state").recent(10)
    assert [(e.healer, e.result) for e in entries] == [("clip", "applied"), ("clip", "in_progress")]
    assert (tmp_path / "state" / "findings.jsonl").read_text().count('"event": "firing"') == 2
