"""Adaptive gradient clipping in the style of ZClip, tunable by the daemon through the control file.

Fixed clipping at 1.0 is either always on (when healthy norms sit above 1) or never on (when they
sit far below 1, as in large LLMs), so it cannot tell a spike from a normal step. ZClip (Kumar et
al., 2025) keeps an exponential moving average of the grad norm's mean and variance, computes the
step's z-score, and only when it exceeds a threshold clips to a bound derived from the statistics:

- ``zscore``: clip to ``mean + z_threshold * std``;
- ``reciprocal`` (ZClip's default): clip to ``mean + (z_threshold**2 / z) * std``, so the larger
  the spike the harder it is pulled back.

Clipping alone leaves an extreme outlier (a corrupt batch: z of 30 to hundreds in the bench) a
normal-sized step in a wrong direction, and Adam-style optimisers, which normalise per coordinate,
keep it. So above a second, higher threshold (``skip_z_threshold``) the step is *skipped*, still
without a host-side branch: the gradients are zeroed, and `AdaptiveClipper.step` hands fused
optimizers (``torch.optim.AdamW(..., fused=True)`` and the others GradScaler drives the same way)
a ``found_inf`` flag on the device, which makes them leave parameters, moments and step counts
untouched. A zeroed gradient alone is not a skip for Adam: it still takes one step along the old
momentum, which ``bench/spikes.py`` measures at 0.13-0.15 extra loss (summed over 20 steps) per
bad batch, against about 0 for a true skip and 0.44 for fixed clipping at 1.0. A skipped norm does
not enter the statistics. At most ``max_consecutive_skips`` steps in a row are skipped; the next
one is clipped instead, so a lasting change of the norm (or a too-low threshold) slows training
down rather than stopping it. ``skip_z_threshold = inf`` turns skipping off (plain ZClip).

The statistics are updated with the *clipped* norm, so a spike does not poison them. During the
warm-up (``ClipSettings.warmup_steps``) the clipper clips at ``warmup_max_norm`` and collects
norms; it then starts from their median and MAD-derived spread, which a spike inside the warm-up
cannot drag. Non-finite norms are never fed into the statistics (NaN/Inf is a fault for the
daemon, not a spike) and their gradients are left untouched.

Everything per step is tensor arithmetic on the gradients' device (``torch.where``, no
``.item()``), so the clipper adds no host-device synchronisation. The returned pre-clip norm is a
tensor; read it one step late if you report it. ``fixed`` mode is plain clipping at
``warmup_max_norm`` (the daemon can still change it).

torch is imported lazily, so importing this module costs nothing in the daemon.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from trainwarden.control import ClipSettings, clip_settings_problems
from trainwarden.errors import TrainwardenError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ClipMode = Literal["zscore", "reciprocal", "fixed"]
CLIP_MODES: tuple[ClipMode, ...] = ("zscore", "reciprocal", "fixed")
_EPS = 1e-6
# Scale of the MAD to a normal standard deviation.
_MAD_TO_STD = 1.4826


class ClipSettingsError(TrainwardenError):
    """Clip settings that cannot be used; the clipper keeps its previous settings."""


def validate_settings(settings: ClipSettings, where: str = "clip settings") -> None:
    """Raise `ClipSettingsError` naming every bad field of `settings`.

    Values come from a JSON control file, so a field may hold any JSON type or a 401-digit
    integer: each is reported like any other bad value, never raised as a TypeError or
    OverflowError into the training loop (`trainwarden.control.clip_settings_problems`).
    """
    bad = clip_settings_problems(settings)
    if bad:
        raise ClipSettingsError(f"{where}: " + "; ".join(bad))


@dataclass(frozen=True, slots=True)
class ClipStats:
    """Host-side view of the clipper, read on demand (this synchronises; do it rarely)."""

    steps: int
    clipped_steps: int
    skipped_steps: int
    warming_up: bool
    mean: float
    std: float
    rejected_updates: int
    settings: ClipSettings
    mode: ClipMode


class AdaptiveClipper:
    """Clip gradients in place and return the pre-clip total norm (a 0-d tensor).

    Use it where you would call ``clip_grad_norm_``, after ``backward()`` (and after DDP has
    averaged the gradients, so every rank computes the same norm and clips identically)::

        clipper = AdaptiveClipper(model.parameters())
        loss.backward()
        norm = clipper.clip()          # tensor, no host sync
        clipper.step(optimizer)        # optimizer.step(), skipped on the device for an outlier

    Gradients must be replicated (DDP); for sharded gradients (FSDP) the norm would need a
    cross-rank reduction, which this clipper does not do.
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        settings: ClipSettings | None = None,
        mode: ClipMode = "reciprocal",
    ) -> None:
        if mode not in CLIP_MODES:
            raise ClipSettingsError(f"clip mode {mode!r} must be one of {', '.join(CLIP_MODES)}")
        self._settings = settings if settings is not None else ClipSettings()
        validate_settings(self._settings)
        self._params = [p for p in parameters if p.requires_grad]
        if not self._params:
            raise ClipSettingsError("AdaptiveClipper needs at least one parameter that requires grad")
        self.mode: ClipMode = mode
        self.rejected_updates = 0
        self._step = 0  # host-side count: we know it without asking the device
        self._tensors_ready = False

    # --- state kept on the device ---------------------------------------------------------------

    def _init_tensors(self, device: torch.device) -> None:
        import torch  # noqa: PLC0415 - torch is imported lazily on purpose

        f32 = torch.float32
        self._mean = torch.zeros((), dtype=f32, device=device)
        self._var = torch.zeros((), dtype=f32, device=device)
        self._warm = torch.full((self._settings.warmup_steps,), math.nan, dtype=f32, device=device)
        self._clipped = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive skips so far
        self._skip_flag = torch.zeros((), dtype=f32, device=device)  # 1.0: the last clip() skipped
        self._tensors_ready = True

    @property
    def settings(self) -> ClipSettings:
        """The settings in force."""
        return self._settings

    @property
    def warming_up(self) -> bool:
        """True while the clipper still collects warm-up norms."""
        return self.mode != "fixed" and self._step < self._settings.warmup_steps

    # --- the step -------------------------------------------------------------------------------

    def clip(self) -> torch.Tensor:
        """Clip the gradients in place; return the total L2 norm they had before clipping."""
        import torch  # noqa: PLC0415

        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            if self._tensors_ready:
                self._skip_flag = torch.zeros_like(self._skip_flag)
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if total.dtype != torch.float32:
            total = total.to(torch.float32)
        if not self._tensors_ready:
            self._init_tensors(total.device)
        finite = torch.isfinite(total)
        s = self._settings
        if self.mode == "fixed" or self._step < s.warmup_steps:
            bound = torch.full_like(total, s.warmup_max_norm)
            target = torch.minimum(total, bound)
            if self.mode != "fixed":
                self._warm[self._step] = torch.where(finite, total, torch.full_like(total, math.nan))
            self._step += 1
            if self.mode != "fixed" and self._step == s.warmup_steps:
                self._start_statistics()
            self._skip_flag = torch.zeros_like(self._skip_flag)
        else:
            target, skip = self._adaptive_target(total, finite)
            self._skipped.add_(skip)
            self._skip_flag = skip.to(torch.float32)
            self._step += 1
        # A non-finite norm keeps coefficient 1: multiplying NaN gradients fixes nothing.
        clipped = finite & (target < total)
        coef = torch.where(clipped, target / (total + _EPS), 1.0)
        if coef.dtype != grads[0].dtype:
            coef = coef.to(grads[0].dtype)
        torch._foreach_mul_(grads, coef)  # the fused op clip_grad_norm_ itself uses
        self._clipped.add_(clipped)
        return total

    @property
    def skip_flag(self) -> torch.Tensor | None:
        """0-d float32 tensor on the device: 1.0 when the last `clip()` skipped the step (None before it)."""
        return self._skip_flag if self._tensors_ready else None

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, left out on the device when the last `clip()` skipped the step.

        Fused optimizers take GradScaler's protocol (``_step_supports_amp_scaling`` and a
        ``found_inf`` attribute for the duration of the step); a nonzero flag makes them change
        nothing. Any other optimizer, or one inside a GradScaler step that already carries a
        ``found_inf``, just steps: the gradients are already zero, so only momentum moves it.
        """
        if (
            not self._tensors_ready
            or not getattr(optimizer, "_step_supports_amp_scaling", False)
            or hasattr(optimizer, "found_inf")
        ):
            optimizer.step()
            return
        optimizer.found_inf = self._skip_flag  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]

    def _start_statistics(self) -> None:
        """Seed mean/variance from the warm-up norms with median and MAD (robust to a spike)."""
        import torch  # noqa: PLC0415

        warm = self._warm
        valid = torch.isfinite(warm)
        # nanmedian ignores the NaNs we stored for non-finite norms; all-NaN gives NaN, handled below.
        median = torch.nanmedian(warm)
        mad = torch.nanmedian((warm - median).abs().where(valid, torch.full_like(warm, math.nan)))
        std = torch.maximum(mad * _MAD_TO_STD, median.abs() * 0.01)
        ok = torch.isfinite(median) & torch.isfinite(std)
        self._mean = torch.where(ok, median, torch.zeros_like(median))
        self._var = torch.where(ok, std * std, torch.zeros_like(std))

    def _adaptive_target(
        self, total: torch.Tensor, finite: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm to scale the gradients to, whether the step is skipped), both on the device."""
        import torch  # noqa: PLC0415

        s = self._settings
        std = torch.sqrt(self._var).clamp_min(_EPS)
        z = (total - self._mean) / std
        if self.mode == "reciprocal":
            bound = self._mean + (s.z_threshold * s.z_threshold / z.clamp_min(_EPS)) * std
        else:
            bound = self._mean + s.z_threshold * std
        spike = finite & (z > s.z_threshold)
        clipped = torch.where(spike, bound, total)
        skip = finite & (z > s.skip_z_threshold) & (self._run < s.max_consecutive_skips)
        # A NaN step neither extends nor ends a run of skips.
        self._run = torch.where(skip, self._run + 1, torch.where(finite, 0, self._run))
        # EMA update with the clipped value (ZClip's update order: variance against the new mean);
        # a skipped norm was judged not to belong to the distribution and leaves it alone.
        a = s.ema_alpha
        new_mean = a * self._mean + (1.0 - a) * clipped
        new_var = a * self._var + (1.0 - a) * (clipped - new_mean) ** 2
        keep = finite & ~skip
        self._mean = torch.where(keep, new_mean, self._mean)
        self._var = torch.where(keep, new_var, self._var)
        return torch.where(skip, 0.0, clipped), skip

    # --- control --------------------------------------------------------------------------------

    def update(self, settings: ClipSettings, where: str = "control file") -> bool:
        """Apply settings from the daemon; invalid ones are logged, counted and ignored (→ False).

        Never raises: it runs in the training loop with whatever the control file held.
        """
        try:
            if settings == self._settings:
                return True
            validate_settings(settings, where)
        except Exception as exc:  # nothing from the control file may reach the training loop
            self.rejected_updates += 1
            log.warning("ignoring clip settings: %s", exc)
            return False
        old = self._settings
        self._settings = settings
        # Resize whenever the old or the new settings put this step inside the warm-up: clip() indexes
        # the warm-up norms by step (a longer warm-up set after the old one ended restarts it).
        if (
            self._tensors_ready
            and settings.warmup_steps != old.warmup_steps
            and self._step < max(old.warmup_steps, settings.warmup_steps)
        ):
            self._resize_warmup(settings.warmup_steps)
        log.info("clip settings changed: %s -> %s", old, settings)
        return True

    def _resize_warmup(self, steps: int) -> None:
        import torch  # noqa: PLC0415

        kept = self._warm[: min(steps, self._step)]
        self._warm = torch.full((steps,), math.nan, dtype=kept.dtype, device=kept.device)
        self._warm[: kept.numel()] = kept
        if self._step >= steps:
            self._step = steps
            self._start_statistics()

    # --- introspection and checkpointing (these synchronise) -------------------------------------

    def stats(self) -> ClipStats:
        """Counters and statistics as host values; call rarely (e.g. when reporting, one step late)."""
        ready = self._tensors_ready
        return ClipStats(
            steps=self._step,
            clipped_steps=int(self._clipped.item()) if ready else 0,
            skipped_steps=int(self._skipped.item()) if ready else 0,
            warming_up=self.warming_up,
            mean=float(self._mean.item()) if ready else 0.0,
            std=math.sqrt(max(float(self._var.item()), 0.0)) if ready else 0.0,
            rejected_updates=self.rejected_updates,
            settings=self._settings,
            mode=self.mode,
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for checkpoints; float32 values round-trip exactly through Python floats."""
        ready = self._tensors_ready
        return {
            "mode": self.mode,
            "step": self._step,
            "settings": asdict(self._settings),
            "mean": float(self._mean.item()) if ready else 0.0,
            "var": float(self._var.item()) if ready else 0.0,
            "warm": [float(v) for v in self._warm.tolist()] if ready else [],
            "clipped": int(self._clipped.item()) if ready else 0,
            "skipped": int(self._skipped.item()) if ready else 0,
            "skip_run": int(self._run.item()) if ready else 0,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()`; the saved settings win unless the daemon changes them later."""
        import torch  # noqa: PLC0415

        try:
            settings = ClipSettings(**dict(state["settings"]))
            validate_settings(settings, "clipper state")
            mode = state["mode"]
            if mode not in CLIP_MODES:
                raise ClipSettingsError(f"clipper state: unknown mode {mode!r}")
            step = int(state["step"])
            warm = [float(v) for v in state["warm"]]
            mean, var, clipped = float(state["mean"]), float(state["var"]), int(state["clipped"])
            # absent from states saved before skipping existed
            skipped, run = int(state.get("skipped", 0)), int(state.get("skip_run", 0))
            _check_state(settings, step, warm, mean=mean, var=var, counts=(clipped, skipped, run))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ClipSettingsError(f"clipper state: malformed: {exc!r}"[:500]) from exc
        device = self._params[0].device
        self._settings = replace(settings)
        self.mode = mode
        self._step = step
        self._init_tensors(device)
        f32 = torch.float32
        self._mean = torch.tensor(mean, dtype=f32, device=device)
        self._var = torch.tensor(var, dtype=f32, device=device)
        if warm:
            self._warm = torch.tensor(warm, dtype=f32, device=device)
        self._clipped = torch.tensor(clipped, dtype=torch.int64, device=device)
        self._skipped = torch.tensor(skipped, dtype=torch.int64, device=device)
        self._run = torch.tensor(run, dtype=torch.int64, device=device)


def _check_state(
    settings: ClipSettings, step: int, warm: list[float], *, mean: float, var: float, counts: tuple[int, ...]
) -> None:
    """Refuse a saved state that would make a later `clip()` fail or misbehave (ValueError)."""
    if step < 0 or any(n < 0 or n >= 1 << 62 for n in counts):
        raise ValueError(f"negative or huge step/counters: {step}, {counts}")
    # clip() indexes the warm-up norms by step until the warm-up ends (after it, any length is fine)
    if warm and step < settings.warmup_steps and len(warm) != settings.warmup_steps:
        raise ValueError(f"{len(warm)} warm-up norms for warmup_steps={settings.warmup_steps}")
    if not (math.isfinite(mean) and math.isfinite(var) and var >= 0):
        raise ValueError(f"mean={mean!r}, var={var!r} must be finite, var >= 0")
