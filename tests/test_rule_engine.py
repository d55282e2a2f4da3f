"""The rule engine: `for` durations, hysteresis and resolve, error isolation, metrics and the finding log."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainwarden.config import default_config
from trainwarden.daemon.exporter import make_registry
from trainwarden.model import Finding, FindingState, Severity
from trainwarden.plugins import plugin_groups
from trainwarden.rules.base import Rule, RuleOptions, RuleView
from trainwarden.rules.engine import FindingLog, RuleEngine
from trainwarden.store import Store

LABELS = {"rule": "scripted", "subject": "job=toy,rank=1"}


@dataclass
class Script:
    """What the scripted rule asserts on the next evaluations."""

    subjects: list[str]
    explode: bool = False


class ScriptedRule(Rule):
    """A rule whose assertions the test controls, to exercise the engine alone."""

    name = "scripted"

    def __init__(self, options: RuleOptions, script: Script) -> None:
        super().__init__(options)
        self.script = script

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        if self.script.explode:
            raise ZeroDivisionError("bad rule")
        return [
            self.finding({"job": "toy", "rank": r}, f"rank {r} bad", {"x": 1.0}) for r in self.script.subjects
        ]


def _engine(tmp_path: Path, script: Script, **options: float) -> tuple[RuleEngine, Store]:
    store = Store()
    rule = ScriptedRule(RuleOptions(**options), script)  # type: ignore[arg-type]
    return RuleEngine([rule], store, FindingLog(tmp_path / "findings.jsonl")), store


def test_for_duration_pending_then_firing(tmp_path: Path) -> None:
    """A condition fires only after holding for `for_seconds`; a blip shorter than that never fires."""
    script = Script(["1"])
    engine, store = _engine(tmp_path, script, for_seconds=10)
    assert engine.tick(0.0) == []
    assert engine.active()[0].state is FindingState.PENDING
    registry = make_registry(store)
    assert registry.get_sample_value("trainwarden_rule_pending", LABELS) == 1
    script.subjects = []
    assert engine.tick(5.0) == []
    assert engine.active() == []  # the blip is forgotten
    script.subjects = ["1"]
    engine.tick(6.0)
    fired = engine.tick(16.0)
    assert [(f.state, f.since) for f in fired] == [(FindingState.FIRING, 6.0)]
    assert registry.get_sample_value("trainwarden_rule_active", LABELS) == 1


def test_hysteresis_then_resolve(tmp_path: Path) -> None:
    """A firing finding stays firing through short gaps and resolves after `resolve_after_seconds`."""
    script = Script(["1"])
    engine, store = _engine(tmp_path, script, resolve_after_seconds=10)
    assert engine.tick(0.0)[0].state is FindingState.FIRING
    script.subjects = []
    assert [f.state for f in engine.tick(5.0)] == [FindingState.FIRING]
    script.subjects = ["1"]
    engine.tick(6.0)
    script.subjects = []
    assert [f.state for f in engine.tick(15.0)] == [FindingState.FIRING]
    resolved = engine.tick(16.0)
    assert [f.state for f in resolved] == [FindingState.RESOLVED]
    assert engine.tick(17.0) == []
    assert make_registry(store).get_sample_value("trainwarden_rule_active", LABELS) is None
    events = [json.loads(line) for line in (tmp_path / "findings.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["firing", "resolved"]
    assert events[0]["evidence"] == {"x": 1.0}
    assert events[0]["subject"] == {"job": "toy", "rank": "1"}


def test_raising_rule_is_counted_and_skipped(tmp_path: Path) -> None:
    """A rule that raises is counted in rule_errors_total and keeps its findings; the engine goes on."""
    script = Script(["1"])
    engine, store = _engine(tmp_path, script, resolve_after_seconds=1)
    engine.tick(0.0)
    script.explode = True
    assert [f.state for f in engine.tick(5.0)] == [FindingState.FIRING]  # not resolved by an error
    registry = make_registry(store)
    assert registry.get_sample_value("trainwarden_rule_errors_total", {"rule": "scripted"}) == 1
    assert registry.get_sample_value("trainwarden_rule_evaluations_total", {"rule": "scripted"}) == 2


def test_finding_log_write_failure_is_counted(tmp_path: Path) -> None:
    """When the finding log cannot be written the failure is counted, and findings still fire."""
    (tmp_path / "findings.jsonl").mkdir()
    engine, store = _engine(tmp_path, Script(["1"]))
    assert len(engine.tick(0.0)) == 1
    assert make_registry(store).get_sample_value("trainwarden_finding_log_errors_total", {}) == 1


def test_from_config_runs_every_default_rule(tmp_path: Path) -> None:
    """The engine built from the default config runs every registered rule on an empty store."""
    config = default_config(plugin_groups())
    store = Store()
    engine = RuleEngine.from_config(config, store)
    assert "stall" in engine.rule_names
    assert "spike" in engine.rule_names
    assert engine.tick(0.0) == []


def test_finding_log_rotates(tmp_path: Path) -> None:
    """The finding log is rotated to `.1` once it would grow past its size limit."""
    log = FindingLog(tmp_path / "findings.jsonl", max_bytes=600)
    finding = Finding("stall", {"job": "toy"}, Severity.WARNING, "x" * 100, evidence={"v": float("inf")})
    for _ in range(6):
        log.write("firing", finding, 1.0)
    assert (tmp_path / "findings.jsonl.1").exists()
    assert (tmp_path / "findings.jsonl").stat().st_size <= 600
    first = json.loads((tmp_path / "findings.jsonl").read_text().splitlines()[0])
    assert first["evidence"] == {"v": "inf"}
