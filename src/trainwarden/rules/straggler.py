"""A rank persistently slower than the other ranks of its job on this node.

Each rank's step time is the median of its last `recent_points` step durations; a rank is a
straggler when that is `ratio` times the median of the *other* ranks (leave-one-out, so two ranks can
be compared) and slower by at least `min_excess_seconds`. Persistence comes from `for_seconds`.
Across nodes this is Prometheus' job (the shipped alert rules).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView, median
from trainwarden.rules.training import STEP_SECONDS, positive_values


@dataclass(frozen=True)
class StragglerOptions(RuleOptions):
    """Comparison parameters."""

    ratio: float = 1.5
    min_excess_seconds: float = 0.05
    recent_points: int = 20
    min_points: int = 5
    for_seconds: float = 60.0

    def problems(self) -> list[tuple[str, str]]:
        """Ratio above 1, sane point counts."""
        found = super().problems()
        if self.ratio <= 1:
            found.append(("ratio", "must be > 1"))
        if self.min_points < 1:
            found.append(("min_points", "must be >= 1"))
        elif self.recent_points < self.min_points:  # filed under both: either may be the typo
            found.append(("recent_points", "must be >= min_points"))
            found.append(("min_points", "must be <= recent_points"))
        return found


class StragglerRule(Rule):
    """One finding per straggling rank."""

    name = "straggler"
    Options = StragglerOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Compare every rank's recent median step time with its job's other ranks."""
        del now
        options = self.options
        assert isinstance(options, StragglerOptions)
        per_job: dict[str, dict[str, float]] = {}
        for labels, points in view.windows(STEP_SECONDS):
            values = positive_values(points)[-options.recent_points :]
            if len(values) < options.min_points:
                continue
            found = dict(labels)
            per_job.setdefault(found.get("job", ""), {})[found.get("rank", "")] = median(values)
        findings = []
        for job, ranks in sorted(per_job.items()):
            if len(ranks) < 2:
                continue
            for rank, own in sorted(ranks.items()):
                others = median([v for r, v in ranks.items() if r != rank])
                if own > options.ratio * others and own - others >= options.min_excess_seconds:
                    evidence: dict[str, float | str] = {
                        "step_seconds": own,
                        "others_median_seconds": others,
                        "ratio": round(own / others, 3),
                        "ranks_compared": len(ranks),
                        "interruption": "persistent",
                    }
                    summary = (
                        f"rank {rank} of job {job}: steps take {own:.3g}s vs {others:.3g}s on the other ranks"
                    )
                    findings.append(
                        self.finding({"job": job, "rank": rank}, summary, evidence, Severity.WARNING)
                    )
        return findings


RULE = StragglerRule
