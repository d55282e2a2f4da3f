"""Throughput drop: a job's recent steps are much slower than its own earlier steps.

Compares the median step time of the last `recent_seconds` with that of the earlier part of the
window, over all ranks of the job. A stalled job produces no recent steps and is the stall rule's
finding instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView, median
from trainwarden.rules.training import STEP_SECONDS


@dataclass(frozen=True)
class ThroughputOptions(RuleOptions):
    """`drop_ratio` 0.3 fires when throughput falls below 70 % of the baseline."""

    drop_ratio: float = 0.3
    recent_seconds: float = 60.0
    min_points: int = 10
    for_seconds: float = 60.0

    def problems(self) -> list[tuple[str, str]]:
        """Ratio in (0, 1), positive window."""
        found = super().problems()
        if not 0 < self.drop_ratio < 1:
            found.append(("drop_ratio", "must be in (0, 1)"))
        if self.recent_seconds <= 0:
            found.append(("recent_seconds", "must be > 0"))
        if self.min_points < 1:
            found.append(("min_points", "must be >= 1"))
        return found


class ThroughputDropRule(Rule):
    """One finding per job whose step rate fell by more than `drop_ratio`."""

    name = "throughput_drop"
    Options = ThroughputOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Recent vs. baseline median step time per job."""
        options = self.options
        assert isinstance(options, ThroughputOptions)
        cutoff = now - options.recent_seconds
        recent: dict[str, list[float]] = {}
        baseline: dict[str, list[float]] = {}
        for labels, points in view.windows(STEP_SECONDS):
            job = dict(labels).get("job", "")
            for point in points:
                if not point.value > 0:  # also drops NaN
                    continue
                (recent if point.timestamp >= cutoff else baseline).setdefault(job, []).append(point.value)
        findings = []
        for job in sorted(recent):
            now_values, before = recent[job], baseline.get(job, [])
            if len(now_values) < options.min_points or len(before) < options.min_points:
                continue
            ratio = median(before) / median(now_values)  # throughput now / throughput before
            if ratio < 1 - options.drop_ratio:
                evidence: dict[str, float | str] = {
                    "throughput_ratio": round(ratio, 4),
                    "recent_step_seconds": median(now_values),
                    "baseline_step_seconds": median(before),
                    "interruption": "persistent",
                }
                summary = f"job {job}: throughput at {ratio:.0%} of its baseline"
                findings.append(self.finding({"job": job}, summary, evidence, Severity.WARNING))
        return findings


RULE = ThroughputDropRule
