"""Runs the rules each tick and turns their raw assertions into pending, firing and resolved findings.

Rules only say "this is wrong now". The engine adds what Prometheus alerting rules have: a `for`
duration before a finding fires, hysteresis (a firing finding stays active until it has not been
asserted for `resolve_after_seconds`), and resolution. A rule that raises is counted and skipped;
its findings keep their state until it evaluates again. Transitions are appended to a JSON-lines
finding log with their evidence, so an on-call can read why something fired.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainwarden.config import Config
from trainwarden.model import Finding, FindingState, Labels, MetricKind, MetricSpec, Sample
from trainwarden.rules import rule_classes
from trainwarden.rules.base import Rule, RuleOptions, RuleView
from trainwarden.store import Store

log = logging.getLogger(__name__)

SOURCE = "rules"
FINDING_LOG_NAME = "findings.jsonl"

RULE_ACTIVE = MetricSpec(
    "trainwarden_rule_active",
    "1 while a rule's finding on a subject is firing (series vanish on resolve).",
    labelnames=("rule", "subject"),
)
RULE_PENDING = MetricSpec(
    "trainwarden_rule_pending",
    "1 while a rule's condition holds on a subject but its `for` duration has not passed yet.",
    labelnames=("rule", "subject"),
)
RULE_EVALUATIONS = MetricSpec(
    "trainwarden_rule_evaluations_total",
    "Rule evaluations run.",
    MetricKind.COUNTER,
    ("rule",),
)
RULE_ERRORS = MetricSpec(
    "trainwarden_rule_errors_total",
    "Rule evaluations that raised; the rule was skipped for that tick.",
    MetricKind.COUNTER,
    ("rule",),
)
RULE_FIRED = MetricSpec(
    "trainwarden_rule_findings_fired_total",
    "Findings that went from pending to firing.",
    MetricKind.COUNTER,
    ("rule",),
)
FINDING_LOG_ERRORS = MetricSpec(
    "trainwarden_finding_log_errors_total",
    "Finding-log lines that could not be written (disk full, permissions).",
    MetricKind.COUNTER,
)


@dataclass
class _Tracked:
    finding: Finding
    first_seen: float
    last_seen: float
    firing: bool


class FindingLog:
    """Append-only JSON lines of finding transitions, rotated once at `max_bytes` (one `.1` kept)."""

    def __init__(self, path: Path, max_bytes: int = 10 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.errors = 0

    def write(self, event: str, finding: Finding, now: float) -> None:
        """Append one transition; failures are counted and logged, never raised."""
        record = {
            "time": now,
            "event": event,
            "rule": finding.rule,
            "subject": dict(finding.subject),
            "severity": finding.severity.value,
            "summary": finding.summary,
            "since": finding.since,
            "evidence": json_safe(finding.evidence),
            "source": finding.source,
        }
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self.path.replace(self.path.with_suffix(self.path.suffix + ".1"))
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
        except OSError as exc:
            self.errors += 1
            log.warning("cannot write finding log %s: %s", self.path, exc)


def json_safe(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """Evidence as strict JSON: NaN/Inf become strings ("nan", "inf") instead of invalid tokens."""
    out: dict[str, Any] = {}
    for key, value in evidence.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = str(value)
        else:
            out[key] = value
    return out


class RuleEngine:
    """Evaluates every enabled rule each `tick(now)` and keeps the active findings.

    Call `tick(now)` from a scheduler job; it returns the findings firing now plus the ones that
    resolved at this tick (state RESOLVED), which is what the policy consumes.
    """

    def __init__(self, rules: Sequence[Rule], store: Store, finding_log: FindingLog | None = None) -> None:
        names = [r.name for r in rules]
        if len(names) != len(set(names)):
            raise ValueError(f"rule names must be unique, got {names}")
        self._rules = list(rules)
        self._store = store
        self._log = finding_log
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._previous: dict[tuple[str, Labels], float] = {}
        self._evaluations = dict.fromkeys(names, 0)
        self._errors = dict.fromkeys(names, 0)
        self._fired = dict.fromkeys(names, 0)

    @classmethod
    def from_config(cls, config: Config, store: Store) -> RuleEngine:
        """Every registered rule that the config enables, logging under the state dir."""
        options = config.plugins.get("rules", {})
        rules: list[Rule] = []
        for name, rule_cls in rule_classes().items():
            rule_options = options.get(name) or rule_cls.Options()
            assert isinstance(rule_options, RuleOptions)
            if rule_options.enabled:
                rules.append(rule_cls(rule_options))
        return cls(rules, store, FindingLog(config.daemon.state_dir / FINDING_LOG_NAME))

    @property
    def rule_names(self) -> list[str]:
        """Names of the rules this engine runs."""
        return [r.name for r in self._rules]

    def status(self) -> dict[str, object]:
        """JSON-able state for `/status` and `trainwarden status`: rules, counters, active findings."""
        return {
            "rules": self.rule_names,
            "evaluations": dict(self._evaluations),
            "errors": dict(self._errors),
            "active": [
                {
                    "rule": t.finding.rule,
                    "subject": t.finding.subject_key,
                    "state": t.finding.state.value,
                    "since": t.finding.since,
                    "summary": t.finding.summary,
                }
                for t in self._tracked.values()
            ],
        }

    def active(self) -> list[Finding]:
        """Every pending or firing finding."""
        return [t.finding for t in self._tracked.values()]

    def tick(self, now: float) -> list[Finding]:
        """Evaluate all rules once; return firing findings and those resolved at this tick."""
        active_subjects: dict[str, set[str]] = {}
        for rule_name, subject in self._tracked:
            active_subjects.setdefault(rule_name, set()).add(subject)
        view = RuleView(
            self._store,
            previous=self._previous,
            active={rule: frozenset(subjects) for rule, subjects in active_subjects.items()},
        )
        out: list[Finding] = []
        for rule in self._rules:
            self._evaluations[rule.name] += 1
            try:
                asserted = rule.evaluate(view, now)
            except Exception:
                self._errors[rule.name] += 1
                log.exception("rule %s raised; skipped this tick", rule.name)
                out.extend(t.finding for (r, _), t in self._tracked.items() if r == rule.name and t.firing)
                continue
            out.extend(self._advance(rule, asserted, now))
        self._previous = {(s.name, s.labels): s.value for s in self._store.latest()}
        self._publish(now)
        return out

    def _advance(self, rule: Rule, asserted: Sequence[Finding], now: float) -> list[Finding]:
        out: list[Finding] = []
        seen: set[str] = set()
        for raw in asserted:
            key = (rule.name, raw.subject_key)
            if raw.subject_key in seen:
                continue  # a rule asserting one subject twice counts once
            seen.add(raw.subject_key)
            tracked = self._tracked.get(key)
            if tracked is None:
                tracked = _Tracked(raw, first_seen=now, last_seen=now, firing=False)
                self._tracked[key] = tracked
            tracked.last_seen = now
            state = FindingState.FIRING if tracked.firing else FindingState.PENDING
            tracked.finding = replace(raw, rule=rule.name, state=state, since=tracked.first_seen)
            if not tracked.firing and now - tracked.first_seen >= rule.for_seconds(raw):
                tracked.firing = True
                tracked.finding = replace(tracked.finding, state=FindingState.FIRING)
                self._fired[rule.name] += 1
                self._write("firing", tracked.finding, now)
            if tracked.firing:
                out.append(tracked.finding)
        for key, tracked in list(self._tracked.items()):
            if key[0] != rule.name or key[1] in seen:
                continue
            if not tracked.firing:
                del self._tracked[key]  # pending and no longer true: never fired, nothing to resolve
            elif now - tracked.last_seen >= rule.options.resolve_after_seconds:
                del self._tracked[key]
                resolved = replace(tracked.finding, state=FindingState.RESOLVED)
                self._write("resolved", resolved, now)
                out.append(resolved)
            else:
                out.append(tracked.finding)  # hysteresis: still firing until resolve_after passes
        return out

    def _write(self, event: str, finding: Finding, now: float) -> None:
        log.info("finding %s: %s %s: %s", event, finding.rule, finding.subject_key, finding.summary)
        if self._log is not None:
            self._log.write(event, finding, now)

    def _publish(self, now: float) -> None:
        samples: list[Sample] = []
        for (rule, subject), tracked in self._tracked.items():
            spec = RULE_ACTIVE if tracked.firing else RULE_PENDING
            samples.append(spec.sample(1.0, rule=rule, subject=subject))
        for rule in self._evaluations:
            samples.append(RULE_EVALUATIONS.sample(self._evaluations[rule], rule=rule))
            samples.append(RULE_ERRORS.sample(self._errors[rule], rule=rule))
            samples.append(RULE_FIRED.sample(self._fired[rule], rule=rule))
        samples.append(FINDING_LOG_ERRORS.sample(self._log.errors if self._log else 0))
        self._store.replace(SOURCE, samples, now)
