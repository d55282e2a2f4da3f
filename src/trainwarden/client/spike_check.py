"""The job-side loss-spike check of `Snapshotter`: a finite loss far above its trend, rolled back like a NaN.

Off unless given (`Snapshotter(..., spike=SpikeCheck())`): a false positive would change a healthy run.
The decision is the daemon's `spike` rule's detector (`trainwarden.spike_math`: log scale, rolling
median center, MAD scale, `z_threshold` and `min_jump_ratio`, a warm-up of `min_baseline_points`
points), run on the losses every rank agreed on at the boundary, so every rank decides the same.
The series it learns from is the run's own trajectory: losses of steps that were rolled back (and so
of skipped batches) never enter it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trainwarden.spike_math import find_spikes, threshold_problems


@dataclass(frozen=True)
class SpikeCheck:
    """The detector's parameters; the defaults are the daemon's `[rules.spike]` defaults.

    The series is one loss per step: at each boundary, the largest loss any rank reported for the
    step. `min_baseline_points` steps of warm-up (again after a restart: the trend is not saved).
    """

    z_threshold: float = 5.0
    min_jump_ratio: float = 3.0
    min_baseline_points: int = 50
    baseline_points: int = 200
    trend_points: int = 20
    min_scale_ratio: float = 0.01

    def __post_init__(self) -> None:
        problems = threshold_problems(self)
        if problems:
            raise ValueError("SpikeCheck: " + "; ".join(f"{name} {why}" for name, why in problems))


@dataclass(frozen=True)
class SpikeFound:
    """The first spiking step of an interval."""

    step: int
    ratio: float  # loss / its rolling center
    z: float

    @property
    def reason(self) -> str:
        """The rollback's reason."""
        return f"loss spike (x{self.ratio:.1f} over the trend)"


class LossTrend:
    """The accepted (step, loss) points the check compares new ones with; identical on every rank.

    Only finite, positive losses are kept (the detector takes logs), and only as many as the
    detector reads: `baseline_points + trend_points`.
    """

    def __init__(self, check: SpikeCheck) -> None:
        self.check = check
        self._points: list[tuple[int, float]] = []

    @property
    def points(self) -> tuple[tuple[int, float], ...]:
        """The accepted points, oldest first."""
        return tuple(self._points)

    def first_spike(self, steps: Sequence[int], losses: Sequence[float]) -> SpikeFound | None:
        """The first of `steps` whose loss is a spike against the accepted points and its predecessors."""
        history = [v for _, v in self._points]
        spikes, _ = find_spikes([*history, *losses], len(history), self.check)
        if not spikes:
            return None
        first = spikes[0]
        return SpikeFound(steps[first.index - len(history)], first.ratio, first.z)

    def accept(self, steps: Sequence[int], losses: Sequence[float]) -> None:
        """These steps are part of the run's trajectory from now on."""
        self._points.extend((s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v) and v > 0)
        del self._points[: -(self.check.baseline_points + self.check.trend_points)]

    def forget_from(self, step: int) -> None:
        """Steps from `step` on were rolled back: drop them (they are trained again, or skipped)."""
        self._points = [(s, v) for s, v in self._points if s < step]
