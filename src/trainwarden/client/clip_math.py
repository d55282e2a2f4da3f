"""The adaptive clipper's statistics on the host or on the device, and its warm-up start.

`AdaptiveClipper` keeps its ZClip statistics in one of two forms. For CPU gradients, whose norm is
already in host memory (a read is a load, not a sync), they are Python numbers (`Stats`) and the
step is float arithmetic. On an accelerator they stay on the gradients' device (`DeviceClip`), so
nothing syncs with the host; there every tensor op is a kernel launch of some 5-10 µs of host
time, so the step is a few vector ops on lanes of one float32 buffer, not one op per scalar: 25
ops a step after the warm-up (51 when each scalar was its own 0-d tensor), 12 during it, against
`clip_grad_norm_`'s 8 (tests/test_clipping_ops.py keeps the count; `bench/clipper.py` prints it).
Both forms take the same decisions (tests/test_clipping_paths.py); the device form's float32
statistics stay within 1e-5 of the host form's float64 (lerp and fused multiply-adds: closer than
the one-op-per-scalar form they replace).

torch is imported lazily, so importing this module costs nothing in the daemon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainwarden.control import ClipSettings

# Scale of the MAD to a normal standard deviation.
MAD_TO_STD = 1.4826
EPS = 1e-6


@dataclass(slots=True)
class Stats:
    """Running statistics as host numbers (the host path's state, and the device path's on a read)."""

    mean: float
    var: float
    run: int  # consecutive skips so far
    clipped: int
    skipped: int
    warm: list[float]  # warm-up norms, NaN where not (yet) finite


# Lanes of `DeviceClip`'s float32 buffer. Strided views over it turn each step's scalar arithmetic
# into a few vector ops: t - [-EPS, m, 0] (lanes 4, 7, 10) divided by [1, s, -1] (11, 12, 13) gives
# [t + EPS, z, -t] (0, 3, 6); [z, -t, -run] (3, 6, 9) compared with one threshold row per decision
# gives spike and skip; the state [m, v, -run] (7, 8, 9) takes [nm, nv, 0] (14, 15, 16) in one where.
_DEN, _Z, _NEG_EPS, _NEG_T, _MEAN, _VAR, _NEG_RUN, _ZERO, _ONE, _STD, _MINUS_ONE, _NEW = (
    0, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14,
)  # fmt: skip
_LANES = 17
# A saved run of skips above every allowed max_consecutive_skips (1000) acts the same at any size;
# capped, it stays exact in float32.
_RUN_CAP = 1 << 20


class DeviceClip:
    """ZClip statistics and step as tensors on the gradients' device: no host read, few kernels.

    The run of skips is kept negated in the float32 buffer (exact: it never exceeds 1000); the
    clipped and skipped counters are int64, which float32 would stop counting at 2**24.
    """

    def __init__(self, device: torch.device, settings: ClipSettings) -> None:
        import torch  # noqa: PLC0415 - torch is imported lazily on purpose

        w = torch.zeros(_LANES, dtype=torch.float32, device=device)
        for lane, value in ((_NEG_EPS, -EPS), (_ONE, 1.0), (_MINUS_ONE, -1.0)):
            w[lane].fill_(value)  # fills, not a copy from host memory: no sync even here
        self._w = w
        self._mean, self._var, self._std, self._z = w[_MEAN], w[_VAR], w[_STD], w[_Z]
        self._den, self._zero, self._one, self._neg_run = w[_DEN], w[_ZERO], w[_ONE], w[_NEG_RUN]
        self._shift = w[_NEG_EPS : _ZERO + 1 : 3]  # [-EPS, m, 0]
        self._scale = w[_ONE : _MINUS_ONE + 1]  # [1, s, -1]
        self._lanes = w[_DEN : _NEG_T + 1 : 3]  # [t + EPS, z, -t] after the division
        self._judged = w.as_strided((2, 3), (0, 3), _Z)  # [z, -t, -run] twice
        self._state = w[_MEAN : _NEG_RUN + 1]  # [m, v, -run]
        self._new = w[_NEW : _NEW + 3]  # [nm, nv, 0]
        self._new_mean, self._new_var = w[_NEW], w[_NEW + 1]
        self._thresholds = torch.full((2, 3), -math.inf, dtype=torch.float32, device=device)
        self._z_limits = (self._thresholds[0, 0], self._thresholds[1, 0])
        self._max_run = self._thresholds[1, 2]
        self._hits = torch.empty((2, 3), dtype=torch.bool, device=device)
        self._finite = self._hits[0, 1]
        # [spike, skip] after the comparison, then [gradients scaled, skip]: what the counters add
        self._flags = torch.zeros(2, dtype=torch.bool, device=device)
        self._first, self._skip = self._flags[0], self._flags[1]
        self._counts = torch.zeros(2, dtype=torch.int64, device=device)  # [clipped, skipped]
        self._clipped = self._counts[0]
        self.warm = torch.full((settings.warmup_steps,), math.nan, dtype=torch.float32, device=device)
        self._configure(settings)

    def _configure(self, settings: ClipSettings) -> None:
        """Write the thresholds rows: [z_threshold, -inf, -inf] (spike), [skip_z, -inf, -max_skips] (skip)."""
        self._z_limits[0].fill_(settings.z_threshold)
        self._z_limits[1].fill_(settings.skip_z_threshold)
        self._max_run.fill_(-settings.max_consecutive_skips)  # -run > -max: room for one more skip
        self._settings = settings

    def capped(self, total: torch.Tensor, max_norm: float, warm_index: int | None) -> torch.Tensor:
        """Coefficient for clipping at `max_norm` (warm-up, fixed mode); records the warm-up norm."""
        import torch  # noqa: PLC0415

        # t + t * 0 is t when finite, NaN for NaN or inf: the warm-up record and the finiteness test
        if warm_index is None:
            norm = torch.addcmul(total, total, self._zero)
        else:
            norm = torch.addcmul(total, total, self._zero, out=self.warm[warm_index])
        target = norm.clamp_max(max_norm)
        torch.lt(target, norm, out=self._first)
        self._clipped.add_(self._first)
        return torch.where(self._first, target / (total + EPS), self._one)

    def adaptive(
        self, total: torch.Tensor, settings: ClipSettings, reciprocal: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficient, skip flag as float32) for norm `total` after the warm-up; updates the state."""
        import torch  # noqa: PLC0415

        if settings is not self._settings:
            self._configure(settings)
        torch.sqrt(self._var, out=self._std)
        self._std.clamp_min_(EPS)
        torch.div(total - self._shift, self._scale, out=self._lanes)
        torch.gt(self._judged, self._thresholds, out=self._hits)
        # spike: z > z_threshold, t finite; skip: z > skip_z_threshold, t finite, room for a skip
        torch.all(self._hits, dim=1, out=self._flags)
        spike, skip = self._first, self._skip
        zt = settings.z_threshold
        if reciprocal:  # mean + z_threshold**2 / z * std, used only where z > z_threshold
            z = self._z.clamp_min(EPS) if zt < EPS else self._z
            bound = torch.addcdiv(self._mean, self._std, z, value=zt * zt)
        else:
            bound = torch.add(self._mean, self._std, alpha=zt)
        clipped = torch.where(spike, bound, total)
        target = torch.where(skip, self._zero, clipped)
        # A non-finite norm was neither spike nor skip, so its target is itself: coefficient 1.
        torch.lt(target, total, out=self._first)
        coef = torch.where(self._first, target / self._den, self._one)
        # EMA with the clipped norm (ZClip's order: variance against the new mean), unless skipped;
        # lerp(x, old, a) is a * old + (1 - a) * x in one op.
        a = settings.ema_alpha
        torch.lerp(clipped, self._mean, a, out=self._new_mean)
        deviation = clipped - self._new_mean
        torch.lerp(deviation * deviation, self._var, a, out=self._new_var)
        keep = torch.gt(self._finite, skip)  # finite and not skipped
        skip_flag = skip.to(torch.float32)
        self._neg_run.sub_(skip_flag)  # a NaN step neither extends nor ends a run of skips
        torch.where(keep, self._new, self._state, out=self._state)
        self._counts.add_(self._flags)
        return coef, skip_flag

    def start_statistics(self) -> None:
        """Seed mean and variance from the warm-up norms' median and MAD (robust to a spike)."""
        import torch  # noqa: PLC0415

        warm = self.warm  # NaN where a norm was not finite: nanmedian leaves those out
        median = torch.nanmedian(warm)
        mad = torch.nanmedian((warm - median).abs())
        std = torch.maximum(mad * MAD_TO_STD, median.abs() * 0.01)
        ok = std < math.inf  # NaN when every warm-up norm was
        torch.where(ok, median, self._zero, out=self._mean)
        torch.where(ok, std * std, self._zero, out=self._var)

    def resize_warmup(self, steps: int, keep: int) -> None:
        """A warm-up record of `steps` norms that keeps the first `keep`."""
        import torch  # noqa: PLC0415

        kept = self.warm[:keep]
        warm = torch.full((steps,), math.nan, dtype=torch.float32, device=kept.device)
        warm[: kept.numel()] = kept
        self.warm = warm

    def host_stats(self) -> Stats:
        """The statistics as host numbers (this synchronises)."""
        w, counts = self._w.tolist(), self._counts.tolist()
        return Stats(
            mean=w[_MEAN],
            var=w[_VAR],
            run=round(-w[_NEG_RUN]),
            clipped=counts[0],
            skipped=counts[1],
            warm=self.warm.tolist(),
        )

    def load(self, stats: Stats) -> None:
        """Take `stats` (from a checkpoint); an empty warm-up record keeps the current one."""
        import torch  # noqa: PLC0415

        self._mean.fill_(stats.mean)
        self._var.fill_(stats.var)
        self._neg_run.fill_(-min(stats.run, _RUN_CAP))
        self._counts[0].fill_(stats.clipped)
        self._counts[1].fill_(stats.skipped)
        if stats.warm:
            warm = [v if math.isfinite(v) else math.nan for v in stats.warm]
            self.warm = torch.tensor(warm, dtype=torch.float32, device=self.warm.device)


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
