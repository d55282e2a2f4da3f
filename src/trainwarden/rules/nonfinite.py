"""NaN or Inf in loss or grad norm: a fault to recover from, never a statistic.

Asserted per job while any non-finite point lies in the last `recent_seconds`. The evidence names
the first and last bad steps of *every* non-finite point still in the store's window, not only the
recent ones, so a restart that runs later (after a refusal, say) still skips the batch where the
fault began; after a restart the daemon drops the job's windows, so steps of an earlier run never
leak in. `observed_at` is when the newest bad point arrived (the policy's evidence that a fault
persisted after an action took effect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView
from trainwarden.rules.training import GRAD_NORM, LOSS, step_at


@dataclass(frozen=True)
class NonFiniteOptions(RuleOptions):
    """How far back a non-finite value still counts."""

    recent_seconds: float = 60.0

    def problems(self) -> list[tuple[str, str]]:
        """A positive lookback."""
        found = super().problems()
        if self.recent_seconds <= 0:
            found.append(("recent_seconds", "must be > 0"))
        return found


class NonFiniteRule(Rule):
    """One finding per job with recent NaN/Inf loss or grad norm."""

    name = "nonfinite"
    Options = NonFiniteOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Count recent non-finite points per job and where they happened."""
        options = self.options
        assert isinstance(options, NonFiniteOptions)
        cutoff = now - options.recent_seconds
        per_job: dict[str, dict[str, float | str]] = {}
        for metric, name in (("loss", LOSS), ("grad_norm", GRAD_NORM)):
            for labels, points in view.windows(name):
                # one point per record: the store cannot tell two NaN re-reports apart (NaN != NaN)
                by_time = {p.timestamp: p for p in points if not math.isfinite(p.value)}
                bad = sorted(by_time.values(), key=lambda p: p.timestamp)
                if not bad or bad[-1].timestamp < cutoff:
                    continue
                found = dict(labels)
                job, rank = found.get("job", ""), found.get("rank", "")
                evidence = per_job.setdefault(job, {"count": 0.0, "metrics": "", "ranks": ""})
                evidence["count"] = float(evidence["count"]) + len(bad)
                evidence["metrics"] = _add(str(evidence["metrics"]), metric)
                evidence["ranks"] = _add(str(evidence["ranks"]), rank)
                evidence["observed_at"] = max(bad[-1].timestamp, float(evidence.get("observed_at", 0.0)))
                for point in (bad[0], bad[-1]):
                    step = step_at(view, job, rank, point.timestamp)
                    if step is None:
                        continue
                    evidence["first_step"] = min(step, float(evidence.get("first_step", step)))
                    evidence["last_step"] = max(step, float(evidence.get("last_step", step)))
        findings = []
        for job, evidence in sorted(per_job.items()):
            evidence["interruption"] = "transient"
            where = (
                f" at steps {evidence['first_step']:.0f}-{evidence['last_step']:.0f}"
                if "first_step" in evidence
                else ""
            )
            summary = f"job {job}: {evidence['count']:.0f} non-finite {evidence['metrics']} value(s){where}"
            findings.append(self.finding({"job": job}, summary, evidence, Severity.CRITICAL))
        return findings


def _add(joined: str, item: str) -> str:
    items = [i for i in joined.split(",") if i]
    if item not in items:
        items.append(item)
    return ",".join(sorted(items))


RULE = NonFiniteRule
