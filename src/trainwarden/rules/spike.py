"""Spikes in grad norm and log-loss, by a robust z-score against the job's own recent history.

Each point that arrived in the last `recent_seconds` is compared with the median and MAD of the
points before it (at most `baseline_points`); nothing fires until `min_baseline_points` exist
(warm-up). Median/MAD ignore the outliers they are meant to find, so one spike does not hide the
next. Loss is compared on a log scale (it falls by orders of magnitude over a run). NaN/Inf are
skipped here: they are a fault, reported by the `nonfinite` rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainwarden.model import Finding, Labels, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView, median, robust_scale
from trainwarden.rules.training import GRAD_NORM, LOSS, step_at
from trainwarden.store import Point

_SERIES = {"grad_norm": GRAD_NORM, "loss": LOSS}


@dataclass(frozen=True)
class SpikeOptions(RuleOptions):
    """Robust z-score parameters; `min_scale_ratio` floors the scale at that relative change."""

    z_threshold: float = 6.0
    recent_seconds: float = 30.0
    min_baseline_points: int = 30
    baseline_points: int = 200
    min_scale_ratio: float = 0.01
    metrics: tuple[str, ...] = ("grad_norm", "loss")

    def problems(self) -> list[tuple[str, str]]:
        """Positive thresholds and known metric names."""
        found = super().problems()
        if self.z_threshold <= 0:
            found.append(("z_threshold", "must be > 0"))
        if self.recent_seconds <= 0:
            found.append(("recent_seconds", "must be > 0"))
        if self.min_baseline_points < 3 or self.baseline_points < self.min_baseline_points:
            found.append(("min_baseline_points", "need 3 <= min_baseline_points <= baseline_points"))
        if self.min_scale_ratio < 0:
            found.append(("min_scale_ratio", "must be >= 0"))
        found.extend(
            ("metrics", f"unknown metric {m!r} (valid: {', '.join(sorted(_SERIES))})")
            for m in self.metrics
            if m not in _SERIES
        )
        return found


def _transform(metric: str, value: float) -> float | None:
    if not math.isfinite(value):
        return None
    if metric == "loss":
        return math.log(value) if value > 0 else None
    return value


class SpikeRule(Rule):
    """One finding per job while a recent grad-norm or loss point is a robust outlier."""

    name = "spike"
    Options = SpikeOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """The largest recent z-score per job, if above the threshold."""
        options = self.options
        assert isinstance(options, SpikeOptions)
        worst: dict[str, dict[str, float | str]] = {}
        for metric in options.metrics:
            for labels, points in view.windows(_SERIES[metric]):
                hit = self._worst_point(metric, points, now, options)
                if hit is None:
                    continue
                z, point, center, scale = hit
                job, rank = dict(labels).get("job", ""), dict(labels).get("rank", "")
                current = worst.get(job)
                if current is not None and float(current["z"]) >= z:
                    continue
                worst[job] = self._evidence(view, metric, labels, point, z=z, center=center, scale=scale)
                worst[job]["rank"] = rank
        findings = []
        for job, evidence in sorted(worst.items()):
            summary = (
                f"job {job}: {evidence['metric']} spiked to {evidence['value']:.4g} "
                f"(robust z {evidence['z']:.1f}) on rank {evidence['rank']}"
            )
            findings.append(self.finding({"job": job}, summary, evidence, Severity.WARNING))
        return findings

    def _worst_point(
        self, metric: str, points: list[Point], now: float, options: SpikeOptions
    ) -> tuple[float, Point, float, float] | None:
        cutoff = now - options.recent_seconds
        # only the newest points can be in the baseline; twice as many leaves room for skipped NaNs
        older = [p for p in points if p.timestamp < cutoff][-2 * options.baseline_points :]
        baseline = [v for v in (_transform(metric, p.value) for p in older) if v is not None]
        baseline = baseline[-options.baseline_points :]
        if len(baseline) < options.min_baseline_points:
            return None  # warm-up
        # floor the scale at a relative change: on the log scale of loss a fraction is already relative
        center = median(baseline)
        min_scale = max(options.min_scale_ratio * (1.0 if metric == "loss" else abs(center)), 1e-12)
        center, scale = robust_scale(baseline, min_scale)  # once per series, not per recent point
        best: tuple[float, Point, float, float] | None = None
        for point in points:
            if point.timestamp < cutoff:
                continue
            value = _transform(metric, point.value)
            if value is None:
                continue
            z = (value - center) / scale
            if z > options.z_threshold and (best is None or z > best[0]):
                best = (z, point, center, scale)
        return best

    @staticmethod
    def _evidence(
        view: RuleView, metric: str, labels: Labels, point: Point, *, z: float, center: float, scale: float
    ) -> dict[str, float | str]:
        on_log = metric == "loss"
        evidence: dict[str, float | str] = {
            "metric": metric,
            "value": point.value,
            "z": round(z, 3),
            "baseline_median": math.exp(center) if on_log else center,
            "scale": scale,
            "scale_is_log": "yes" if on_log else "no",
            "interruption": "transient",
        }
        found = dict(labels)
        step = step_at(view, found.get("job", ""), found.get("rank", ""), point.timestamp)
        if step is not None:
            evidence["step"] = step
        return evidence


RULE = SpikeRule
