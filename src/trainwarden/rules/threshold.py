"""A generic threshold on any series, with a duration and optional hysteresis.

Configured as a list of checks, e.g. checkpoint disk almost full or IO pressure high::

    [[rules.threshold.checks]]
    name = "checkpoint_disk_low"
    metric = "trainwarden_host_filesystem_avail_bytes"
    labels = { volume = "checkpoints" }
    op = "<"
    value = 50e9
    clear_value = 80e9
    for_seconds = 120
    subject_labels = ["volume"]

    [[rules.threshold.checks]]
    name = "io_pressure_high"
    metric = "trainwarden_host_pressure_stall_ratio"
    labels = { resource = "io", kind = "full" }
    op = ">"
    value = 0.5
    for_seconds = 60
    interruption = "transient"

`clear_value` gives hysteresis: once firing, the check stays asserted until the value crosses
`clear_value` instead of `value`. The subject is the check name plus only the listed bounded labels.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView, subject_of

Op = Literal[">", ">=", "<", "<=", "==", "!="]
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
BOUNDED_SUBJECT_LABELS = frozenset(
    {
        "job",
        "rank",
        "local_rank",
        "gpu",
        "node",
        "device",
        "port",
        "hca",
        "interface",
        "volume",
        "resource",
        "kind",
    }
)
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class ThresholdCheck:
    """One check: `metric{labels} op value` held for `for_seconds`."""

    name: str = ""
    metric: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    op: Op = ">"
    value: float = 0.0
    clear_value: float | None = None
    for_seconds: float = 0.0
    subject_labels: tuple[str, ...] = ()
    severity: Literal["info", "warning", "critical"] = "warning"
    interruption: Literal["transient", "persistent", "planned"] = "persistent"

    def problems(self) -> list[tuple[str, str]]:
        """Named, with a metric, a non-negative duration and bounded subject labels."""
        found: list[tuple[str, str]] = []
        if not _NAME.match(self.name):
            found.append(("name", f"must match {_NAME.pattern}, got {self.name!r}"))
        if not self.metric.startswith("trainwarden_"):
            found.append(("metric", f"must be a trainwarden_ series, got {self.metric!r}"))
        if self.for_seconds < 0:
            found.append(("for_seconds", "must be >= 0"))
        found.extend(
            (
                "subject_labels",
                f"{label!r} is not a bounded label (allowed: {', '.join(sorted(BOUNDED_SUBJECT_LABELS))})",
            )
            for label in self.subject_labels
            if label not in BOUNDED_SUBJECT_LABELS
        )
        return found


@dataclass(frozen=True)
class ThresholdOptions(RuleOptions):
    """The list of checks; none by default."""

    checks: tuple[ThresholdCheck, ...] = ()

    def problems(self) -> list[tuple[str, str]]:
        """Check names are unique."""
        found = super().problems()
        names = [c.name for c in self.checks]
        found.extend(
            ("checks", f"check name {n!r} used twice") for n in sorted(set(names)) if names.count(n) > 1
        )
        return found


class ThresholdRule(Rule):
    """One finding per check and subject whose condition holds."""

    name = "threshold"
    Options = ThresholdOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Evaluate every check against the matching series."""
        del now
        options = self.options
        assert isinstance(options, ThresholdOptions)
        active = view.active_subjects(self.name)
        findings = []
        for check in options.checks:
            hits: dict[str, tuple[dict[str, str], float]] = {}
            for series in view.series(check.metric):
                labels = dict(series.labels)
                if any(labels.get(k) != v for k, v in check.labels.items()) or math.isnan(series.value):
                    continue
                subject = {"check": check.name, **subject_of(series.labels, check.subject_labels)}
                key = ",".join(f"{k}={v}" for k, v in sorted(subject.items()))
                limit = check.clear_value if key in active and check.clear_value is not None else check.value
                if not _OPS[check.op](series.value, limit):
                    continue
                worse = key in hits and not _OPS[check.op](series.value, hits[key][1])
                if key not in hits or not worse:
                    hits[key] = (subject, series.value)
            for subject, value in hits.values():
                evidence: dict[str, float | str] = {
                    "check": check.name,
                    "metric": check.metric,
                    "value": value,
                    "op": check.op,
                    "threshold": check.value,
                    "interruption": check.interruption,
                }
                summary = f"{check.name}: {check.metric} = {value:.4g} {check.op} {check.value:.4g}"
                findings.append(self.finding(subject, summary, evidence, Severity(check.severity)))
        return findings

    def for_seconds(self, finding: Finding) -> float:
        """Each check has its own duration."""
        options = self.options
        assert isinstance(options, ThresholdOptions)
        for check in options.checks:
            if check.name == finding.subject.get("check"):
                return check.for_seconds
        return options.for_seconds


RULE = ThresholdRule
