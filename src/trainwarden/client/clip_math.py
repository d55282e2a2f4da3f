"""The adaptive clipper's scalar arithmetic, on the host or on the device, and its warm-up start.

`AdaptiveClipper` writes its statistics update once, over `HostMath` (Python floats: for CPU
gradients, whose norm is already in host memory, a read is a load, not a sync, and some 40 tiny
tensor ops of 3-5 µs dispatch each become float arithmetic) or `DeviceMath` (0-d tensors on the
gradients' device: no host-device sync). Both take the same decisions (tests/test_clipping_paths.py).

torch is imported lazily, so importing this module costs nothing in the daemon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Scale of the MAD to a normal standard deviation.
MAD_TO_STD = 1.4826


class HostMath:
    """The clipper's scalar arithmetic on Python floats, for gradients in host memory (CPU).

    A CPU tensor's value is already in host memory, so reading the norm is a load, not a sync,
    and some 40 tiny tensor ops (3-5 µs of dispatch each) become float arithmetic.
    """

    on_host = True

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        """`a` where `cond` holds, else `b`."""
        return a if cond else b

    @staticmethod
    def isfinite(x: Any) -> Any:
        """Neither NaN nor infinite."""
        return math.isfinite(x)

    @staticmethod
    def sqrt(x: Any) -> Any:
        """Square root."""
        return math.sqrt(x)

    @staticmethod
    def floor(x: Any, low: float) -> Any:
        """At least `low` (NaN stays NaN, like clamp_min)."""
        return max(x, low)  # x first: NaN stays NaN

    @staticmethod
    def cap(x: Any, high: float) -> Any:
        """At most `high` (NaN stays NaN, like clamp_max)."""
        return min(x, high)  # x first: NaN stays NaN

    @staticmethod
    def not_(x: Any) -> Any:
        """Logical not."""
        return not x


class DeviceMath:
    """The same arithmetic as 0-d tensors on the gradients' device: no host-device sync."""

    on_host = False

    def __init__(self, torch: Any) -> None:
        self._torch = torch

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """`a` where `cond` holds, else `b`."""
        return self._torch.where(cond, a, b)

    def isfinite(self, x: Any) -> Any:
        """Neither NaN nor infinite."""
        return self._torch.isfinite(x)

    def sqrt(self, x: Any) -> Any:
        """Square root."""
        return self._torch.sqrt(x)

    @staticmethod
    def floor(x: Any, low: float) -> Any:
        """At least `low` (NaN stays NaN, like clamp_min)."""
        return x.clamp_min(low)

    @staticmethod
    def cap(x: Any, high: float) -> Any:
        """At most `high` (NaN stays NaN, like clamp_max)."""
        return x.clamp_max(high)

    @staticmethod
    def not_(x: Any) -> Any:
        """Logical not."""
        return ~x


@dataclass(slots=True)
class Stats:
    """Running statistics: Python numbers (`HostMath`) or 0-d tensors (`DeviceMath`)."""

    mean: Any
    var: Any
    run: Any  # consecutive skips so far
    clipped: Any
    skipped: Any
    warm: Any  # warm-up norms, NaN where not (yet) finite: list[float] or a float32 tensor


def robust_start(norms: list[float]) -> tuple[float, float]:
    """(mean, variance) from finite warm-up norms: median and MAD, as `torch.nanmedian` picks them."""
    if not norms:
        return 0.0, 0.0
    median = lower_median(norms)
    mad = lower_median([abs(v - median) for v in norms])
    std = max(mad * MAD_TO_STD, abs(median) * 0.01)
    return median, std * std


def lower_median(values: list[float]) -> float:
    """The lower of the two middle values for an even count, like torch's median."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def robust_start_on_device(warm: Any) -> tuple[Any, Any]:
    """`robust_start` on a float32 tensor of warm-up norms (NaN where not finite), on its device."""
    import torch  # noqa: PLC0415 - torch is imported lazily on purpose

    valid = torch.isfinite(warm)
    # nanmedian ignores the NaNs stored for non-finite norms; all-NaN gives NaN, handled below.
    median = torch.nanmedian(warm)
    mad = torch.nanmedian((warm - median).abs().where(valid, torch.full_like(warm, math.nan)))
    std = torch.maximum(mad * MAD_TO_STD, median.abs() * 0.01)
    ok = torch.isfinite(median) & torch.isfinite(std)
    return torch.where(ok, median, torch.zeros_like(median)), torch.where(
        ok, std * std, torch.zeros_like(std)
    )
