"""A collective (all-reduce, barrier, ...) in flight longer than its learned bound.

The bound is a high quantile of the job's own collective durations (from the duration histogram,
as Prometheus' `histogram_quantile` does) times a safety factor, with a floor; until enough
collectives were timed a generous default applies. Phases where long collectives are normal
(init, checkpoint) are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView
from trainwarden.rules.training import COLLECTIVE_DURATION_BUCKET, COLLECTIVE_IN_FLIGHT, current_phase


@dataclass(frozen=True)
class CollectiveOptions(RuleOptions):
    """Learned-bound parameters."""

    quantile: float = 0.99
    safety_factor: float = 10.0
    floor_seconds: float = 30.0
    min_samples: int = 50
    default_bound_seconds: float = 300.0
    ignore_phases: tuple[str, ...] = ("init", "checkpoint")
    resolve_after_seconds: float = 5.0

    def problems(self) -> list[tuple[str, str]]:
        """Quantile in (0, 1], positive bounds."""
        found = super().problems()
        if not 0 < self.quantile <= 1:
            found.append(("quantile", "must be in (0, 1]"))
        for key in ("safety_factor", "floor_seconds", "default_bound_seconds"):
            if getattr(self, key) <= 0:
                found.append((key, "must be > 0"))
        if self.min_samples < 1:  # a bound learned from no collectives at all
            found.append(("min_samples", "must be >= 1"))
        return found


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Quantile from cumulative (upper bound, count) buckets, interpolating inside the bucket."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # the +Inf bucket has no width: answer its lower edge, as Prometheus
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


class CollectiveStuckRule(Rule):
    """One finding per rank whose oldest open collective exceeds the job's bound."""

    name = "collective_stuck"
    Options = CollectiveOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Compare each rank's in-flight age with its job's learned bound."""
        options = self.options
        assert isinstance(options, CollectiveOptions)
        buckets_by_job: dict[str, dict[float, float]] = {}
        for series in view.series(COLLECTIVE_DURATION_BUCKET):
            labels = dict(series.labels)
            try:
                upper = float(labels.get("le", ""))
            except ValueError:
                continue
            per_job = buckets_by_job.setdefault(labels.get("job", ""), {})
            per_job[upper] = per_job.get(upper, 0.0) + series.value  # summed over ops
        findings = []
        for series in view.series(COLLECTIVE_IN_FLIGHT):
            if series.value <= 0:
                continue
            labels = dict(series.labels)
            job, rank = labels.get("job", ""), labels.get("rank", "")
            phase = current_phase(view, job, rank)
            if phase in options.ignore_phases:
                continue
            age = series.value + max(0.0, now - series.timestamp)
            buckets = sorted(buckets_by_job.get(job, {}).items())
            count = buckets[-1][1] if buckets else 0.0
            if count >= options.min_samples:
                learned = histogram_quantile(options.quantile, buckets)
                bound = max(options.floor_seconds, learned * options.safety_factor)
                source = "learned"
            else:
                learned, bound, source = float("nan"), options.default_bound_seconds, "default"
            if age <= bound:
                continue
            evidence: dict[str, float | str] = {
                "in_flight_seconds": round(age, 3),
                "bound_seconds": round(bound, 3),
                "bound_source": source,
                "collectives_seen": count,
                "learned_quantile_seconds": learned,
                "phase": phase,
                "interruption": "transient",
            }
            summary = f"rank {rank} of job {job}: a collective in flight for {age:.0f}s (bound {bound:.0f}s)"
            findings.append(self.finding({"job": job, "rank": rank}, summary, evidence, Severity.CRITICAL))
        return findings


RULE = CollectiveStuckRule
