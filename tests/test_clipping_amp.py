"""AdaptiveClipper with mixed precision: bf16 autocast; fp16 with a GradScaler, left alone by a skip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.control import ClipSettings

SETTINGS = ClipSettings(warmup_steps=5, z_threshold=2.5, skip_z_threshold=10.0, ema_alpha=0.9)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def _batch(step: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=gen), torch.randn(4, 2, generator=gen) * scale


def test_bf16_autocast_norm_and_clipping_match_clip_grad_norm() -> None:
    """Under bf16 autocast (float32 parameters and gradients) fixed-mode clipping equals clip_grad_norm_."""
    ours, ref = _model(), _model()
    clipper = AdaptiveClipper(ours.parameters(), ClipSettings(warmup_max_norm=0.05), mode="fixed")
    for model in (ours, ref):
        x, y = _batch(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
    got = clipper.clip()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want))
    assert all(
        torch.allclose(a.grad, b.grad) for a, b in zip(ours.parameters(), ref.parameters(), strict=True)
    )  # type: ignore[arg-type]


def _amp_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clipper: AdaptiveClipper,
    **batch: float,
) -> None:
    """One fp16 step in the documented order: scale, backward, unscale_, clip, clipper.step, update."""
    opt.zero_grad(set_to_none=True)
    x, y = _batch(int(batch.get("step", 0)), batch.get("scale", 1.0))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    clipper.clip()
    clipper.step(opt, scaler)
    scaler.update()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_fp16_skip_goes_through_the_scaler_and_leaves_its_scale_alone(fused: bool) -> None:
    """With fp16 and a GradScaler, an outlier step changes no parameter or moment and the loss scale evolves
    exactly as for an ordinary step (a skip is not an overflow), for fused and unfused AdamW."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    # small scales: the outlier's scaled fp16 gradients must stay finite, so it is the clipper's to skip
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    clipper = AdaptiveClipper(model.parameters(), SETTINGS)
    for step in range(6):
        _amp_step(model, opt, scaler, clipper, step=step)
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])
    scale = scaler.get_scale()
    _amp_step(model, opt, scaler, clipper, step=99, scale=100.0)
    assert clipper.skip_flag is not None
    assert float(clipper.skip_flag) == 1.0
    assert all(torch.equal(t, before[0][k]) for k, t in model.state_dict().items())
    for index, moments in opt.state_dict()["state"].items():
        assert all(torch.equal(v, before[1][index][k]) for k, v in moments.items())
    assert scaler.get_scale() == scale * 2.0  # grew, as after any step without an overflow
    _amp_step(model, opt, scaler, clipper, step=100)
    assert float(clipper.skip_flag) == 0.0
    assert not all(torch.equal(t, before[0][k]) for k, t in model.state_dict().items())
    assert clipper.stats().skipped_steps == 1


def test_fp16_overflow_is_the_scalers_and_does_not_enter_the_clippers_statistics() -> None:
    """An fp16 overflow (inf gradients) is handled by the scaler (scale backs off, no step) and the clipper
    neither skips, counts nor learns from the non-finite norm."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    clipper = AdaptiveClipper(model.parameters(), SETTINGS)
    for step in range(8):
        _amp_step(model, opt, scaler, clipper, step=step)
    stats, scale = clipper.stats(), scaler.get_scale()
    weights = copy.deepcopy(model.state_dict())
    opt.zero_grad(set_to_none=True)
    x, y = _batch(0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss * float("inf")).backward()
    scaler.unscale_(opt)
    norm = clipper.clip()
    clipper.step(opt, scaler)
    scaler.update()
    assert not torch.isfinite(norm)
    assert scaler.get_scale() == scale * 0.5
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
    after = clipper.stats()
    assert (after.mean, after.std, after.skipped_steps) == (stats.mean, stats.std, stats.skipped_steps)


def test_step_with_a_scaler_keeps_an_lr_schedulers_wrapper_of_optimizer_step() -> None:
    """clipper.step(opt, scaler) restores whatever an LR scheduler had put on optimizer.step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    own_step = vars(opt).get("step")
    scaler = torch.amp.GradScaler("cpu")
    clipper = AdaptiveClipper(model.parameters(), SETTINGS)
    _amp_step(model, opt, scaler, clipper)
    scheduler.step()
    assert vars(opt).get("step") is own_step
    assert scheduler.get_last_lr() == [pytest.approx(5e-3)]
