"""Spikes in grad norm and loss: a jump far above the series' own recent trend.

Both series are compared on a log scale (loss falls by orders of magnitude over a run; a grad
norm grows several-fold during LR warm-up). Each point is compared with a *rolling* center, the
median of the `trend_points` points just before it, so a warm-up or a decaying schedule moves
the center along instead of leaving it at the first steps of the run. The residuals of the newest
`baseline_points` points against their own rolling centers give a robust scale (median and MAD,
which ignore the outliers they are meant to find, so the recent points can be part of it). A
recent point is a spike when its residual lies more than `z_threshold` robust standard deviations
above the usual one *and* the point is at least `min_jump_ratio` times its center: noise on a
very quiet series can give a large z for a 30 % wobble, but that is not what a bad batch does
(5-100x). Nothing fires until
`min_baseline_points` finite points exist (warm-up, counted in steps: one point per step record).
NaN/Inf are skipped here: they are a fault, reported by the `nonfinite` rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainwarden.model import Finding, Labels, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView
from trainwarden.rules.training import GRAD_NORM, LOSS, step_at
from trainwarden.spike_math import find_spikes, threshold_problems
from trainwarden.store import Point

_SERIES = {"grad_norm": GRAD_NORM, "loss": LOSS}


@dataclass(frozen=True)
class SpikeOptions(RuleOptions):
    """Robust z-score of log residuals against a rolling median, plus a minimum jump ratio."""

    z_threshold: float = 5.0
    min_jump_ratio: float = 3.0
    recent_seconds: float = 30.0
    min_baseline_points: int = 50
    baseline_points: int = 200
    trend_points: int = 20
    min_scale_ratio: float = 0.01
    metrics: tuple[str, ...] = ("grad_norm", "loss")

    def problems(self) -> list[tuple[str, str]]:
        """Positive thresholds and known metric names."""
        found = super().problems()
        found.extend(threshold_problems(self))  # the shared detector's own (trainwarden.spike_math)
        if not self.recent_seconds > 0:
            found.append(("recent_seconds", "must be > 0"))
        found.extend(
            ("metrics", f"unknown metric {m!r} (valid: {', '.join(sorted(_SERIES))})")
            for m in self.metrics
            if m not in _SERIES
        )
        return found


@dataclass(frozen=True)
class SpikeHit:
    """The worst spike among the candidate points of one series, and the newest one."""

    index: int  # of the worst point, into the values passed in
    newest_index: int  # of the newest point over both thresholds
    z: float
    ratio: float  # value / rolling center
    center: float  # rolling center of the worst point, on the series' own scale
    scale: float  # robust scale of the log residuals


def find_spike(values: Sequence[float], first_candidate: int, options: SpikeOptions) -> SpikeHit | None:
    """Score `values[first_candidate:]` against the trend of the points before each; None if no spike.

    Pure and shared by the rule, its tests and `bench/spike_false_positives.py`, so what is
    measured is what runs; the arithmetic is `trainwarden.spike_math`, which the client's job-side
    `SpikeCheck` runs too. Non-finite and non-positive values are ignored (no log).
    """
    spikes, scale = find_spikes(values, first_candidate, options)
    if not spikes:
        return None
    worst = spikes[0]
    for spike in spikes[1:]:
        if spike.z > worst.z:  # the first of equal z-scores, as before
            worst = spike
    return SpikeHit(worst.index, spikes[-1].index, worst.z, worst.ratio, worst.center, scale)


class SpikeRule(Rule):
    """One finding per job while a recent grad-norm or loss point jumps far above its trend."""

    name = "spike"
    Options = SpikeOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """The largest recent z-score per job, if above both thresholds."""
        options = self.options
        assert isinstance(options, SpikeOptions)
        cutoff = now - options.recent_seconds
        # the trend before the baseline needs `trend_points` more; twice that leaves room for NaNs
        keep = 2 * (options.baseline_points + options.trend_points)
        worst: dict[str, dict[str, float | str]] = {}
        newest: dict[str, float] = {}
        for metric in options.metrics:
            for labels, points in view.windows(_SERIES[metric]):
                recent = sum(p.timestamp >= cutoff for p in points)
                window = points[-(keep + recent) :]
                hit = find_spike([p.value for p in window], len(window) - recent, options)
                if hit is None:
                    continue
                job = dict(labels).get("job", "")
                newest[job] = max(newest.get(job, 0.0), window[hit.newest_index].timestamp)
                current = worst.get(job)
                if current is not None and float(current["z"]) >= hit.z:
                    continue
                worst[job] = self._evidence(view, metric, labels, window[hit.index], hit)
        findings = []
        for job, evidence in sorted(worst.items()):
            evidence["observed_at"] = newest[job]
            summary = (
                f"job {job}: {evidence['metric']} spiked to {evidence['value']:.4g}, "
                f"{evidence['ratio']:.1f}x its trend {evidence['baseline_median']:.4g} "
                f"(robust z {evidence['z']:.1f}) on rank {evidence['rank']}"
            )
            findings.append(self.finding({"job": job}, summary, evidence, Severity.WARNING))
        return findings

    @staticmethod
    def _evidence(
        view: RuleView, metric: str, labels: Labels, point: Point, hit: SpikeHit
    ) -> dict[str, float | str]:
        found = dict(labels)
        evidence: dict[str, float | str] = {
            "metric": metric,
            "value": point.value,
            "z": round(hit.z, 3),
            "ratio": round(hit.ratio, 3),
            "baseline_median": hit.center,
            "scale": hit.scale,
            "scale_is_log": "yes",
            "rank": found.get("rank", ""),
            "interruption": "transient",
        }
        step = step_at(view, found.get("job", ""), found.get("rank", ""), point.timestamp)
        if step is not None:
            evidence["step"] = step
        return evidence


RULE = SpikeRule
