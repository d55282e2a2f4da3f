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

On an accelerator everything per step is tensor arithmetic on the gradients' device
(``torch.where``, no ``.item()``; 25 ops after the warm-up, `clip_math.DeviceClip`), so the
clipper adds no host-device synchronisation; CPU gradients are in host memory already, so there
the statistics are Python floats and an unclipped step is not multiplied (same decisions). The
norm is global: FSDP2's sharded DTensor gradients are reduced across ranks
(`trainwarden.client.grad_norm`), so every rank clips and skips alike. The returned pre-clip norm
is a tensor; read it one step late if you report it. ``fixed`` mode is plain clipping at
``warmup_max_norm`` (the daemon can still change it).

torch is imported lazily, so importing this module costs nothing in the daemon.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from trainwarden.client import clip_math, grad_norm
from trainwarden.control import ClipSettings, clip_settings_problems
from trainwarden.errors import TrainwardenError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ClipMode = Literal["zscore", "reciprocal", "fixed"]
CLIP_MODES: tuple[ClipMode, ...] = ("zscore", "reciprocal", "fixed")
_EPS = 1e-6


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


def _host_side(device: torch.device) -> bool:
    """True when the clipper's statistics live in host memory (gradients on the CPU)."""
    return device.type == "cpu"


class AdaptiveClipper:
    """Clip gradients in place and return the pre-clip total norm (a 0-d tensor).

    Use it where you would call ``clip_grad_norm_``, after ``backward()`` (after DDP has averaged
    the gradients, or with FSDP2's sharded DTensor gradients as they are)::

        clipper = AdaptiveClipper(model.parameters())
        loss.backward()
        norm = clipper.clip()          # tensor, no host sync
        clipper.step(optimizer)        # optimizer.step(), skipped on the device for an outlier

    Every rank computes the same global norm (`trainwarden.client.grad_norm`), so every rank
    clips and skips identically. With fp16 and a GradScaler, call ``scaler.unscale_(optimizer)``
    before `clip` and ``clipper.step(optimizer, scaler)`` instead of ``scaler.step(optimizer)``.
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
        self._ready = False  # the statistics are made at the first clip(), on the norm's device
        self._st = clip_math.Stats(0.0, 0.0, 0, 0, 0, [])  # host path (CPU gradients)
        self._dev: clip_math.DeviceClip | None = None  # device path (accelerators)
        self._flags: tuple[Any, Any] = (None, None)  # (0.0, 1.0) as tensors on the device
        self._skip_flag: Any = None

    # --- state --------------------------------------------------------------------------------

    def _init_state(self, device: torch.device) -> None:
        import torch  # noqa: PLC0415 - torch is imported lazily on purpose

        f32 = torch.float32
        warmup = self._settings.warmup_steps
        self._st = clip_math.Stats(0.0, 0.0, 0, 0, 0, [math.nan] * warmup)
        self._dev = None if _host_side(device) else clip_math.DeviceClip(device, self._settings)
        self._ready = True
        # Read-only flags handed to optimizers (found_inf); never written in place.
        self._flags = (torch.zeros((), dtype=f32, device=device), torch.ones((), dtype=f32, device=device))
        self._skip_flag = self._flags[0]

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
            if self._ready:
                self._skip_flag = self._flags[0]
            return torch.zeros(())
        total = grad_norm.total_norm(grads)
        if not self._ready:
            self._init_state(total.device)
        if self._dev is None:
            coef, skip = self._decide(float(total))  # a load from host memory, not a sync
            self._skip_flag = self._flags[1] if skip else self._flags[0]
            if coef != 1.0:  # a free host branch: an unclipped step costs the norm alone
                torch._foreach_mul_(grad_norm.local_parts(grads), coef)
            return total
        # The fused op clip_grad_norm_ itself uses; a float32 coefficient scales any gradient dtype.
        torch._foreach_mul_(grad_norm.local_parts(grads), self._decide_on_device(self._dev, total))
        return total

    def _decide(self, total: float) -> tuple[float, bool]:
        """(coefficient to scale the gradients by, whether the step is skipped) for norm `total`."""
        st, s = self._st, self._settings
        finite = math.isfinite(total)
        skip = False
        if self.mode == "fixed" or self._step < s.warmup_steps:
            target = min(total, s.warmup_max_norm)  # total first: NaN stays NaN
            if self.mode != "fixed":
                st.warm[self._step] = total if finite else math.nan
            self._step += 1
            if self.mode != "fixed" and self._step == s.warmup_steps:
                self._start_statistics()
        else:
            target, skip = self._adaptive_target(total, finite)
            st.skipped += skip
            self._step += 1
        # A non-finite norm keeps coefficient 1: multiplying NaN gradients fixes nothing.
        clipped = finite and target < total
        st.clipped += clipped
        return (target / (total + _EPS) if clipped else 1.0), skip

    def _decide_on_device(self, dev: clip_math.DeviceClip, total: torch.Tensor) -> torch.Tensor:
        """`_decide` on the device (`clip_math.DeviceClip`): the coefficient; sets the skip flag."""
        s = self._settings
        if self.mode == "fixed" or self._step < s.warmup_steps:
            warming = self.mode != "fixed"
            coef = dev.capped(total, s.warmup_max_norm, self._step if warming else None)
            self._step += 1
            if warming and self._step == s.warmup_steps:
                dev.start_statistics()
            self._skip_flag = self._flags[0]
            return coef
        coef, self._skip_flag = dev.adaptive(total, s, reciprocal=self.mode == "reciprocal")
        self._step += 1
        return coef

    @property
    def skip_flag(self) -> torch.Tensor | None:
        """0-d float32 tensor on the device: 1.0 when the last `clip()` skipped (None before); read-only."""
        return self._skip_flag if self._ready else None

    def step(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        """``optimizer.step()`` (or ``scaler.step(optimizer)``), left out when the last `clip()` skipped.

        Fused optimizers take GradScaler's protocol (``_step_supports_amp_scaling`` and a
        ``found_inf`` attribute for the duration of the step); a nonzero flag makes them change
        nothing. Any other optimizer, or one inside a GradScaler step that already carries a
        ``found_inf``, just steps: the gradients are already zero, so only momentum moves it.

        With an enabled ``torch.amp.GradScaler`` the skip goes through the scaler: a fused
        optimizer gets the scaler's ``found_inf`` plus the skip flag, any other optimizer is not
        stepped (the scaler has just read its own flags on the host, so this read adds no sync).
        The scaler's own overflow record is left alone, so a skip never lowers the loss scale.
        """
        if scaler is not None and scaler.is_enabled():
            self._scaler_step(optimizer, scaler)
            return
        if (
            not self._ready
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

    def _scaler_step(self, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        """``scaler.step(optimizer)`` with the skip flag added to the step's own decision."""
        flag = self._skip_flag
        if not self._ready:
            scaler.step(optimizer)
            return
        own = vars(optimizer)
        shadowed = own.get("step")  # e.g. an LR scheduler's wrapper of the bound method
        inner = optimizer.step

        def guarded(*args: Any, **kwargs: Any) -> Any:
            found_inf = getattr(optimizer, "found_inf", None)
            if found_inf is not None:  # the scaler set it for a fused optimizer
                optimizer.found_inf = found_inf + flag.to(found_inf.device)  # type: ignore[attr-defined]
                return inner(*args, **kwargs)
            if flag.item():
                return None
            return inner(*args, **kwargs)

        own["step"] = guarded
        try:
            scaler.step(optimizer)
        finally:
            if shadowed is None:
                del own["step"]
            else:
                own["step"] = shadowed

    def _start_statistics(self) -> None:
        """Seed mean/variance from the warm-up norms with median and MAD (robust to a spike)."""
        if self._dev is not None:
            self._dev.start_statistics()
            return
        st = self._st
        st.mean, st.var = clip_math.robust_start([v for v in st.warm if math.isfinite(v)])

    def _adaptive_target(self, total: float, finite: bool) -> tuple[float, bool]:
        """(norm to scale the gradients to, whether the step is skipped) on the host.

        `clip_math.DeviceClip.adaptive` is the same arithmetic on the device, in float32.
        """
        st, s = self._st, self._settings
        std = max(math.sqrt(st.var), _EPS)
        z = (total - st.mean) / std
        if self.mode == "reciprocal":
            bound = st.mean + (s.z_threshold * s.z_threshold / max(z, _EPS)) * std
        else:
            bound = st.mean + s.z_threshold * std
        spike = finite and z > s.z_threshold
        clipped = bound if spike else total
        skip = finite and z > s.skip_z_threshold and st.run < s.max_consecutive_skips
        # A NaN step neither extends nor ends a run of skips.
        st.run = st.run + 1 if skip else (0 if finite else st.run)
        # EMA update with the clipped value (ZClip's update order: variance against the new mean);
        # a skipped norm was judged not to belong to the distribution and leaves it alone.
        if finite and not skip:
            a = s.ema_alpha
            new_mean = a * st.mean + (1.0 - a) * clipped
            deviation = clipped - new_mean
            st.mean, st.var = new_mean, a * st.var + (1.0 - a) * (deviation * deviation)
        return (0.0 if skip else clipped), skip

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
            self._ready
            and settings.warmup_steps != old.warmup_steps
            and self._step < max(old.warmup_steps, settings.warmup_steps)
        ):
            self._resize_warmup(settings.warmup_steps)
        log.info("clip settings changed: %s -> %s", old, settings)
        return True

    def _resize_warmup(self, steps: int) -> None:
        keep = min(steps, self._step)
        if self._dev is not None:
            self._dev.resize_warmup(steps, keep)
        else:
            kept = self._st.warm[:keep]
            self._st.warm = kept + [math.nan] * (steps - len(kept))
        if self._step >= steps:
            self._step = steps
            self._start_statistics()

    # --- introspection and checkpointing (these synchronise) -------------------------------------

    def _host_stats(self) -> clip_math.Stats:
        return self._st if self._dev is None else self._dev.host_stats()

    def stats(self) -> ClipStats:
        """Counters and statistics as host values; call rarely (e.g. when reporting, one step late)."""
        st = self._host_stats()
        return ClipStats(
            steps=self._step,
            clipped_steps=st.clipped,
            skipped_steps=st.skipped,
            warming_up=self.warming_up,
            mean=st.mean,
            std=math.sqrt(max(st.var, 0.0)),
            rejected_updates=self.rejected_updates,
            settings=self._settings,
            mode=self.mode,
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for checkpoints; the values round-trip exactly through Python floats."""
        st = self._host_stats()
        return {
            "mode": self.mode,
            "step": self._step,
            "settings": asdict(self._settings),
            "mean": st.mean,
            "var": st.var,
            "warm": [float(v) for v in st.warm] if self._ready else [],
            "clipped": st.clipped,
            "skipped": st.skipped,
            "skip_run": st.run,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()`; the saved settings win unless the daemon changes them later."""
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
        self._settings = replace(settings)
        self.mode = mode
        self._step = step
        self._init_state(self._params[0].device)
        loaded = clip_math.Stats(mean, var, run, clipped, skipped, warm)
        if self._dev is not None:
            self._dev.load(loaded)  # an empty warm-up record keeps the fresh one
        else:
            self._st = replace(loaded, warm=warm or self._st.warm)


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
