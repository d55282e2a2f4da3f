"""The clipper's device path: the ops it dispatches per step (each a kernel launch on an accelerator), and its
float32 arithmetic against the host path's float64.

On a GPU every tensor op costs some 5-10 µs of host time to launch, so the op count, which is
deterministic, is what the device path's cost there follows; `bench/clipper.py` prints it next to
`clip_grad_norm_`'s (8). These tests force the device path on CPU tensors, as it runs on an accelerator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainwarden.client import clipping
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.control import ClipSettings

# What the device path dispatches now; lower is fine, higher is a regression to look at.
WARMUP_OPS = 12  # 3 for the norm, 1 view (the warm-up record's slot), 8 kernels
WARMUP_END_OPS = 24  # the last warm-up step also seeds the statistics (two nanmedians)
ADAPTIVE_OPS = 25  # 3 for the norm, 21 for the statistics and the decision, 1 for the multiply
SETTINGS = ClipSettings(warmup_steps=5, warmup_max_norm=10.0, z_threshold=2.5, skip_z_threshold=10.0)


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, and the views among them (dispatched, no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_path() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clipping, "_host_side", lambda _device: False)
        yield


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(shape)) for shape in ((4, 3), (3,), (2, 2, 2))]


def _set_norm(params: list[torch.nn.Parameter], norm: float) -> None:
    """Gradients of total L2 norm `norm` (NaN or inf included), spread over every parameter."""
    for p in params:
        p.grad = torch.full_like(p, norm / math.sqrt(sum(q.numel() for q in params)))


def _counted(clipper: AdaptiveClipper) -> OpCount:
    with OpCount() as mode:
        clipper.clip()
    return mode


@pytest.mark.usefixtures("device_path")
@pytest.mark.parametrize("mode", ["reciprocal", "zscore"])
def test_device_path_stays_within_its_op_count_on_every_kind_of_step(mode: clipping.ClipMode) -> None:
    """Warm-up, healthy, clipped, skipped and NaN steps each dispatch at most the recorded number of ops."""
    params = _params()
    clipper = AdaptiveClipper(params, SETTINGS, mode=mode)
    _set_norm(params, 1.0)
    clipper.clip()  # the first call also builds the statistics' buffers
    for i, norm in enumerate([1.1, 20.0, 0.9, 1.05]):  # 20 is clipped at warmup_max_norm
        _set_norm(params, norm)
        counted = _counted(clipper)
        assert counted.ops <= (WARMUP_END_OPS if i == 3 else WARMUP_OPS), (i, counted.ops)
    assert not clipper.warming_up
    kinds = {"healthy": 1.0, "clipped": 1.4, "skipped": 500.0, "nan": math.nan, "inf": math.inf}
    for kind, norm in kinds.items():
        before = clipper.stats()
        _set_norm(params, norm)
        counted = _counted(clipper)
        assert (counted.ops, counted.views) <= (ADAPTIVE_OPS, 0), (kind, counted.ops, counted.views)
        after = clipper.stats()
        scaled = after.clipped_steps - before.clipped_steps
        skipped = after.skipped_steps - before.skipped_steps
        assert (scaled, skipped) == {"clipped": (1, 0), "skipped": (1, 1)}.get(kind, (0, 0)), kind


@pytest.mark.usefixtures("device_path")
def test_fixed_mode_on_the_device_costs_the_warmup_ops() -> None:
    """`fixed` mode clips like clip_grad_norm_ and dispatches no more than a warm-up step, forever."""
    params = _params()
    clipper = AdaptiveClipper(params, SETTINGS, mode="fixed")
    _set_norm(params, 1.0)
    clipper.clip()
    for norm in [3.0, 40.0, 0.5] * 3:
        _set_norm(params, norm)
        assert _counted(clipper).ops <= WARMUP_OPS - 1  # no warm-up record to write
    assert clipper.stats().clipped_steps == 3  # the 40s


def _decisions(
    norms: list[float], settings: ClipSettings, *, host: bool, change: tuple[int, ClipSettings] | None = None
) -> tuple[list[tuple[int, int]], clipping.ClipStats]:
    """(clipped, skipped) per step on one path, with an optional update() before a given step."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clipping, "_host_side", lambda _device: host)
        params = _params()
        clipper = AdaptiveClipper(params, settings)
        seen = []
        for step, norm in enumerate(norms):
            if change is not None and step == change[0]:
                assert clipper.update(change[1])
            before = clipper.stats()
            _set_norm(params, norm)
            clipper.clip()
            after = clipper.stats()
            seen.append(
                (after.clipped_steps - before.clipped_steps, after.skipped_steps - before.skipped_steps)
            )
        return seen, clipper.stats()


def test_skip_settings_changed_mid_run_reach_the_device_thresholds() -> None:
    """update() of z_threshold, skip_z_threshold and max_consecutive_skips after the warm-up changes
    the device path's decisions from the next step, exactly as on the host path."""
    warmup = [1.0, 1.1, 0.9, 1.05, 0.95]
    norms = [*warmup, 1.0, 60.0, 60.0, 60.0, 1.0, 8.0, 1.0, 60.0, 60.0]
    looser = replace(SETTINGS, z_threshold=5.0, skip_z_threshold=80.0, max_consecutive_skips=1)
    before, _ = _decisions(norms, SETTINGS, host=False)
    after, _ = _decisions(norms, SETTINGS, host=False, change=(8, looser))
    assert after == _decisions(norms, SETTINGS, host=True, change=(8, looser))[0]
    assert before[:8] == after[:8]
    assert before[8:] != after[8:]


def test_device_statistics_track_the_host_paths_float64_within_float32_rounding() -> None:
    """Over 400 steps of noisy norms with spikes the device path (float32) takes the host path's decisions
    and its mean and std stay within 1e-5 of the host path's (float64)."""
    rng = random.Random(3)
    norms = [rng.uniform(0.5, 1.5) * (30.0 if rng.random() < 0.05 else 1.0) for _ in range(400)]
    settings = replace(SETTINGS, ema_alpha=0.97)
    host, host_stats = _decisions(norms, settings, host=True)
    device, device_stats = _decisions(norms, settings, host=False)
    assert device == host
    assert sum(s for _, s in host) >= 5  # the spikes were skipped, so the comparison covers skips
    assert device_stats.mean == pytest.approx(host_stats.mean, rel=1e-5)
    assert device_stats.std == pytest.approx(host_stats.std, rel=1e-5)


@pytest.mark.usefixtures("device_path")
def test_bf16_gradients_are_scaled_in_place_on_the_device_path() -> None:
    """bf16 gradients are clipped by the float32 coefficient and stay bf16 (no per-step cast)."""
    params = [torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))]
    clipper = AdaptiveClipper(params, SETTINGS)
    params[0].grad = torch.full((64,), 5.0, dtype=torch.bfloat16)  # norm 40 > warmup_max_norm 10
    assert clipper.clip().item() == pytest.approx(40.0)
    grad = params[0].grad
    assert grad.dtype == torch.bfloat16
    assert float(torch.linalg.vector_norm(grad.float())) == pytest.approx(10.0, rel=1e-2)
