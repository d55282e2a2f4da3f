"""AdaptiveClipper: warm-up, z-score clipping, unpoisoned statistics, control updates, no host sync."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trainwarden.client.clipping import AdaptiveClipper, ClipSettingsError
from trainwarden.control import ClipSettings, ControlState, read_control, write_control

WARM = ClipSettings(z_threshold=2.5, ema_alpha=0.9, warmup_steps=5, warmup_max_norm=10.0)


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3)) for _ in range(n)]


def _set_norm(params: list[torch.nn.Parameter], norm: float) -> None:
    """Gradients whose total L2 norm is `norm`, spread over all parameters."""
    per = norm / math.sqrt(len(params))
    for p in params:
        p.grad = torch.tensor([per, 0.0, 0.0])


def _total(params: list[torch.nn.Parameter]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([p.grad for p in params if p.grad is not None])))


def _warm_up(clipper: AdaptiveClipper, params: list[torch.nn.Parameter], norms: list[float]) -> None:
    for norm in norms:
        _set_norm(params, norm)
        clipper.clip()


def test_warmup_clips_at_fixed_max_norm_and_returns_pre_clip_norm() -> None:
    """During warm-up the clipper clips at warmup_max_norm and returns the norm before clipping."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM)
    _set_norm(params, 40.0)
    assert clipper.clip().item() == pytest.approx(40.0)
    assert _total(params) == pytest.approx(10.0, rel=1e-5)
    _set_norm(params, 3.0)
    clipper.clip()
    assert _total(params) == pytest.approx(3.0)
    assert clipper.warming_up


def test_normal_steps_after_warmup_are_untouched() -> None:
    """After warm-up, a norm within the z-threshold leaves the gradients exactly as they were."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM)
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    assert not clipper.warming_up
    _set_norm(params, 1.02)
    before = [p.grad.clone() for p in params if p.grad is not None]
    clipper.clip()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params, strict=True))
    assert clipper.stats().clipped_steps == 0


@pytest.mark.parametrize("mode", ["zscore", "reciprocal"])
def test_spike_is_clipped_to_the_statistical_bound(mode: Any) -> None:
    """A spike is clipped to mean + z*std (zscore) or mean + z^2/score*std (reciprocal) of the EMA stats."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM, mode=mode)
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    stats = clipper.stats()
    _set_norm(params, 50.0)
    assert clipper.clip().item() == pytest.approx(50.0)
    z = (50.0 - stats.mean) / stats.std
    factor = WARM.z_threshold if mode == "zscore" else WARM.z_threshold**2 / z
    assert _total(params) == pytest.approx(stats.mean + factor * stats.std, rel=1e-4)
    assert clipper.stats().clipped_steps == 1


def test_spike_does_not_poison_the_statistics() -> None:
    """The EMA is updated with the clipped norm, so a 1000x spike moves the mean only slightly."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM, mode="zscore")
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    before = clipper.stats()
    _set_norm(params, 1000.0)
    clipper.clip()
    after = clipper.stats()
    assert after.mean < before.mean + WARM.z_threshold * before.std
    # And the next ordinary step is not clipped.
    _set_norm(params, 1.0)
    clipper.clip()
    assert _total(params) == pytest.approx(1.0)


def test_spike_inside_warmup_does_not_skew_the_start() -> None:
    """Statistics start from the median/MAD of warm-up norms, so a spike in warm-up does not inflate them."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM)
    _warm_up(clipper, params, [1.0, 500.0, 0.9, 1.05, 0.95])
    stats = clipper.stats()
    assert stats.mean == pytest.approx(1.0)
    assert stats.std < 0.2


def test_non_finite_norm_leaves_grads_and_stats_alone() -> None:
    """A NaN or Inf norm is a fault, not a spike: gradients are not rescaled and statistics do not move."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM)
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    before = clipper.stats()
    for bad in (float("nan"), float("inf")):
        _set_norm(params, 1.0)
        assert params[0].grad is not None
        params[0].grad[1] = bad
        norm = clipper.clip()
        assert not math.isfinite(norm.item())
        assert params[0].grad[0].item() == pytest.approx(1.0 / math.sqrt(2))
    after = clipper.stats()
    assert (after.mean, after.std, after.clipped_steps) == (before.mean, before.std, 0)


def test_clip_never_reads_device_values_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """No .item(), bool() or float() on tensors inside clip(): no host-device sync per step."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM)

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("host read of a tensor inside clip()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for norm in [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 80.0, 1.0]:
        _set_norm(params, norm)
        clipper.clip()
    monkeypatch.undo()
    assert clipper.stats().clipped_steps == 1


def test_fixed_mode_matches_clip_grad_norm() -> None:
    """`fixed` mode clips exactly like torch.nn.utils.clip_grad_norm_ at warmup_max_norm, forever."""
    ours, ref = _params(), _params()
    clipper = AdaptiveClipper(ours, ClipSettings(warmup_max_norm=1.0), mode="fixed")
    for norm in [0.5, 3.0, 40.0] * 20:
        _set_norm(ours, norm)
        _set_norm(ref, norm)
        got = clipper.clip()
        want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        assert got.item() == pytest.approx(want.item())
        assert all(torch.allclose(a.grad, b.grad) for a, b in zip(ours, ref, strict=True))  # type: ignore[arg-type]
    assert not clipper.warming_up


def test_daemon_settings_arrive_through_the_control_file(tmp_path: Path) -> None:
    """Settings written by the daemon (control file) and applied with update() tighten the threshold."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM, mode="zscore")
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    _set_norm(params, 1.1)
    clipper.clip()
    assert clipper.stats().clipped_steps == 0
    path = tmp_path / "job.control.json"
    tight = ClipSettings(z_threshold=0.5, ema_alpha=0.9, warmup_steps=5, warmup_max_norm=10.0)
    write_control(path, ControlState(job="job", clip=tight))
    state = read_control(path)
    assert state.clip is not None
    assert clipper.update(state.clip)
    _set_norm(params, 1.1)
    clipper.clip()
    assert clipper.stats().clipped_steps == 1
    assert clipper.settings == tight


@pytest.mark.parametrize(
    "bad",
    [
        ClipSettings(z_threshold=0.0),
        ClipSettings(z_threshold=float("nan")),
        ClipSettings(ema_alpha=1.0),
        ClipSettings(warmup_steps=1),
        ClipSettings(warmup_max_norm=-1.0),
    ],
)
def test_invalid_update_is_counted_and_ignored(bad: ClipSettings) -> None:
    """An invalid update from the control file is refused, counted, and the previous settings stay."""
    clipper = AdaptiveClipper(_params(), WARM)
    assert not clipper.update(bad)
    assert clipper.rejected_updates == 1
    assert clipper.settings == WARM
    with pytest.raises(ClipSettingsError, match="clip settings"):
        AdaptiveClipper(_params(), bad)


def test_shortening_warmup_midway_starts_statistics() -> None:
    """Lowering warmup_steps below the steps already seen ends the warm-up at once with the norms so far."""
    params = _params()
    clipper = AdaptiveClipper(params, WARM)
    _warm_up(clipper, params, [1.0, 1.1, 0.9])
    assert clipper.update(ClipSettings(z_threshold=2.5, ema_alpha=0.9, warmup_steps=3, warmup_max_norm=10.0))
    assert not clipper.warming_up
    assert clipper.stats().mean == pytest.approx(1.0)


def test_state_round_trip_continues_bit_identically() -> None:
    """A clipper restored from state_dict() clips the following steps exactly as the original does."""
    norms = [1.0, 1.2, 0.8, 1.1, 0.9, 1.3, 9.0, 1.0, 30.0, 1.1]
    a_params, b_params = _params(), _params()
    a = AdaptiveClipper(a_params, WARM)
    _warm_up(a, a_params, norms[:6])
    b = AdaptiveClipper(b_params, ClipSettings())
    b.load_state_dict(a.state_dict())
    assert b.settings == WARM
    for norm in norms[6:]:
        _set_norm(a_params, norm)
        _set_norm(b_params, norm)
        assert torch.equal(a.clip(), b.clip())
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(a_params, b_params, strict=True))  # type: ignore[arg-type]
    assert a.stats() == b.stats()
    with pytest.raises(ClipSettingsError, match="malformed"):
        b.load_state_dict({"mode": "zscore"})


def test_constructor_rejects_unknown_mode_and_no_parameters() -> None:
    """An unknown mode or an empty parameter list is a clear error at construction."""
    with pytest.raises(ClipSettingsError, match="mode 'median'"):
        AdaptiveClipper(_params(), mode="median")  # type: ignore[arg-type]
    with pytest.raises(ClipSettingsError, match="at least one parameter"):
        AdaptiveClipper([])
