"""The spike detector's arithmetic, shared by the daemon's `spike` rule and the client's `SpikeCheck`.

A point is a spike when its log residual against a rolling median (the `trend_points` points before
it) lies more than `z_threshold` robust standard deviations (median/MAD of the newest
`baseline_points` residuals) above the usual residual *and* the point is at least `min_jump_ratio`
times that median; nothing is a candidate before `min_baseline_points` finite points (warm-up).
Pure standard-library code with no trainwarden import, so the client (which must not import the
daemon's rules) and the rule run the same numbers; docs/HEALING.md, "Spikes", explains the choices.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

MIN_CENTER_POINTS = 3
MAD_TO_SIGMA = 1.4826


class SpikeThresholds(Protocol):
    """The detector's parameters (the rule's `SpikeOptions`, the client's `SpikeCheck`)."""

    @property
    def z_threshold(self) -> float: ...  # noqa: D102 - see the module docstring

    @property
    def min_jump_ratio(self) -> float: ...  # noqa: D102

    @property
    def min_baseline_points(self) -> int: ...  # noqa: D102

    @property
    def baseline_points(self) -> int: ...  # noqa: D102

    @property
    def trend_points(self) -> int: ...  # noqa: D102

    @property
    def min_scale_ratio(self) -> float: ...  # noqa: D102


@dataclass(frozen=True)
class Spike:
    """One point over both thresholds."""

    index: int  # into the values passed in
    z: float
    ratio: float  # value / rolling center
    center: float  # the rolling center, on the series' own scale


def threshold_problems(p: SpikeThresholds) -> list[tuple[str, str]]:
    """(field, problem) for every parameter out of range."""
    found: list[tuple[str, str]] = []
    if not p.z_threshold > 0:
        found.append(("z_threshold", "must be > 0"))
    if not p.min_jump_ratio >= 1:
        found.append(("min_jump_ratio", "must be >= 1 (a multiple of the trend)"))
    if p.min_baseline_points < MIN_CENTER_POINTS:
        found.append(("min_baseline_points", f"must be >= {MIN_CENTER_POINTS}"))
    if p.baseline_points < p.min_baseline_points:  # filed under both: either may be the typo
        found.append(("baseline_points", "must be >= min_baseline_points"))
        found.append(("min_baseline_points", "must be <= baseline_points"))
    if p.trend_points < MIN_CENTER_POINTS:
        found.append(("trend_points", f"must be >= {MIN_CENTER_POINTS}"))
    if not p.min_scale_ratio >= 0:
        found.append(("min_scale_ratio", "must be >= 0"))
    return found


def find_spikes(
    values: Sequence[float], first_candidate: int, p: SpikeThresholds
) -> tuple[list[Spike], float]:
    """Every point of `values[first_candidate:]` over both thresholds, in order, and the robust scale.

    Non-finite and non-positive values are ignored (no log); the scale is 0.0 when nothing was scored.
    """
    logs = [(i, math.log(v)) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
    # a candidate needs `min_baseline_points` finite points before it (warm-up, in steps)
    split = next((n for n, (i, _) in enumerate(logs) if i >= first_candidate), len(logs))
    split = max(split, p.min_baseline_points)
    if split >= len(logs):
        return [], 0.0
    # the scale comes from the newest points, candidates included: median/MAD ignore the few spikes
    start = max(MIN_CENTER_POINTS, min(split, len(logs) - p.baseline_points))
    residuals = rolling_residuals([x for _, x in logs], start, p.trend_points)
    scored = residuals[-p.baseline_points :]
    usual = median(scored)
    spread = median([abs(r - usual) for r in scored])
    scale = max(MAD_TO_SIGMA * spread, p.min_scale_ratio, 1e-12)
    min_jump = math.log(p.min_jump_ratio)
    found = []
    for position in range(split, len(logs)):
        r = residuals[position - start]
        z = (r - usual) / scale
        if z <= p.z_threshold or r < min_jump:
            continue
        index, x = logs[position]
        found.append(Spike(index, z, math.exp(r), math.exp(x - r)))
    return found, scale


def rolling_residuals(logs: Sequence[float], start: int, k: int) -> list[float]:
    """logs[p] minus the median of the (up to) k values before it, for every p >= start.

    A sorted sliding window (bisect) instead of sorting each window: the rule runs every tick on
    every rank's series.
    """
    window = sorted(logs[max(0, start - k) : start])
    out = []
    for position in range(start, len(logs)):
        n = len(window)
        center = window[n // 2] if n % 2 else (window[n // 2 - 1] + window[n // 2]) / 2
        out.append(logs[position] - center)
        bisect.insort(window, logs[position])
        if position - k >= 0:
            del window[bisect.bisect_left(window, logs[position - k])]
    return out


def median(values: Sequence[float]) -> float:
    """Linear-interpolated median of a non-empty sequence (the rules' `quantile(values, 0.5)`)."""
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * 0.5
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
