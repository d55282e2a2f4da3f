"""The clipper's host path (CPU gradients, Python floats) and device path (0-d tensors) decide alike."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainwarden.client import clipping
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.control import ClipSettings

NORMS = st.one_of(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    st.sampled_from([math.nan, math.inf, 0.0, 1e30]),
)


def _run(
    norms: list[float], mode: clipping.ClipMode, cfg: ClipSettings, *, host: bool
) -> list[tuple[bool, bool]]:
    """(scaled?, skipped?) per step on one path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clipping, "_host_side", lambda _device: host)
        param = torch.nn.Parameter(torch.zeros(2))
        clipper = AdaptiveClipper([param], cfg, mode=mode)
        seen = []
        for norm in norms:
            param.grad = torch.tensor([norm, 0.0])
            before = clipper.stats()
            clipper.clip()
            after = clipper.stats()
            seen.append(
                (after.clipped_steps > before.clipped_steps, after.skipped_steps > before.skipped_steps)
            )
        return seen


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    norms=st.lists(NORMS, min_size=1, max_size=40),
    mode=st.sampled_from(clipping.CLIP_MODES),
    warmup=st.integers(min_value=2, max_value=6),
    skip_z=st.sampled_from([4.0, 10.0, math.inf]),
)
def test_host_and_device_paths_clip_and_skip_the_same_steps(
    norms: list[float], mode: clipping.ClipMode, warmup: int, skip_z: float
) -> None:
    """On any norms (NaN, Inf, zeros, huge values among them) both paths scale and skip the same steps."""
    cfg = ClipSettings(warmup_steps=warmup, z_threshold=2.0, skip_z_threshold=skip_z, ema_alpha=0.9)
    host = _run(norms, mode, cfg, host=True)
    device = _run(norms, mode, cfg, host=False)
    assert host == device
