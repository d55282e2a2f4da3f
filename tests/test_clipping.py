"""AdaptiveClipper: warm-up, z-score clipping, unpoisoned statistics, control updates, no host sync."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from trainwarden.client import clipping
from trainwarden.client.clipping import AdaptiveClipper, ClipSettingsError
from trainwarden.control import ClipSettings, ControlState, read_control, write_control

# Skipping off: these settings check the ZClip part alone; SKIP checks the skip on top of it.
WARM = ClipSettings(
    z_threshold=2.5, ema_alpha=0.9, warmup_steps=5, warmup_max_norm=10.0, skip_z_threshold=math.inf
)
SKIP = ClipSettings(
    z_threshold=2.5, ema_alpha=0.9, warmup_steps=5, warmup_max_norm=10.0, skip_z_threshold=10.0
)


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


@pytest.fixture(autouse=True, params=["host", "device"])
def both_paths(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs on the host path (CPU gradients) and on the device path (accelerators)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "device":
            patch.setattr(clipping, "_host_side", lambda _device: False)
        yield


@pytest.fixture
def device_path() -> Iterator[None]:
    """The clipper's device path (what runs on an accelerator), forced on these CPU tensors."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clipping, "_host_side", lambda _device: False)
        yield


@pytest.mark.usefixtures("device_path")
@pytest.mark.parametrize("settings", [WARM, SKIP], ids=["zclip", "skip"])
def test_clip_never_reads_device_values_on_the_host(
    monkeypatch: pytest.MonkeyPatch, settings: ClipSettings
) -> None:
    """No .item(), bool() or float() on tensors in clip(), skipping or not: no host-device sync per step.

    The device path is what runs on an accelerator; CPU gradients take the host path (their values
    are in host memory already), so the test forces the device path on these CPU tensors.
    """
    params = _params()
    clipper = AdaptiveClipper(params, settings)

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
        ClipSettings(z_threshold=3.0, skip_z_threshold=3.0),
        ClipSettings(skip_z_threshold=float("nan")),
        ClipSettings(max_consecutive_skips=0),
        ClipSettings(max_consecutive_skips=True),
        ClipSettings(skip_z_threshold="high"),  # type: ignore[arg-type]
        ClipSettings(z_threshold=None),  # type: ignore[arg-type]
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


def test_extreme_outlier_is_skipped_and_leaves_the_statistics_alone() -> None:
    """Above skip_z_threshold the gradients are zeroed (step skipped), counted, and the EMA does not move."""
    params = _params()
    clipper = AdaptiveClipper(params, SKIP)
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    before = clipper.stats()
    _set_norm(params, 1000.0)
    assert clipper.clip().item() == pytest.approx(1000.0)
    assert _total(params) == 0.0
    after = clipper.stats()
    assert (after.skipped_steps, after.clipped_steps) == (1, 1)
    assert (after.mean, after.std) == (before.mean, before.std)


def test_spike_between_the_thresholds_is_clipped_not_skipped() -> None:
    """A spike above z_threshold but below skip_z_threshold is clipped to the ZClip bound, not zeroed."""
    params = _params()
    clipper = AdaptiveClipper(params, SKIP, mode="zscore")
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    stats = clipper.stats()
    norm = stats.mean + 6.0 * stats.std  # z = 6: between 2.5 and 10
    _set_norm(params, norm)
    clipper.clip()
    assert _total(params) == pytest.approx(stats.mean + SKIP.z_threshold * stats.std, rel=1e-4)
    assert clipper.stats().skipped_steps == 0


def test_consecutive_skips_are_capped_so_training_never_stops() -> None:
    """After max_consecutive_skips in a row the next outlier is clipped instead; then skipping resumes."""
    params = _params()
    clipper = AdaptiveClipper(params, replace(SKIP, max_consecutive_skips=2))
    _warm_up(clipper, params, [1.0, 1.1, 0.9, 1.05, 0.95])
    kept = []
    for _ in range(4):
        _set_norm(params, 1000.0)
        clipper.clip()
        kept.append(_total(params) > 0)
    assert kept == [False, False, True, False]
    assert clipper.stats().skipped_steps == 3


def test_unfused_optimizer_steps_a_skipped_outlier_as_a_zero_gradient() -> None:
    """A non-fused AdamW (no found_inf support) moves on a skipped outlier exactly as on a zero gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ref = torch.nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    clipper = AdaptiveClipper(list(model.parameters()), SKIP)
    x = torch.randn(8, 4)
    for step in range(8):
        scale = 1e4 if step == 7 else 1.0  # an outlier batch after the 5 warm-up steps
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            (scale * m(x).square().mean()).backward()
        clipper.clip()
        if step == 7:
            for p in ref.parameters():
                assert p.grad is not None
                p.grad.zero_()
        else:
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 10.0)  # what the warm-up did
        clipper.step(opt)
        ref_opt.step()
    assert clipper.stats().skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))


def test_state_without_skip_fields_loads_with_defaults_and_skip_run_survives() -> None:
    """A clipper state saved before skipping existed still loads; a saved run of skips carries over."""
    params = _params()
    a = AdaptiveClipper(params, replace(SKIP, max_consecutive_skips=2))
    _warm_up(a, params, [1.0, 1.1, 0.9, 1.05, 0.95, 1000.0])
    b_params = _params()
    b = AdaptiveClipper(b_params, ClipSettings())
    b.load_state_dict(a.state_dict())
    for clipper, ps in ((a, params), (b, b_params)):
        _set_norm(ps, 1000.0)
        clipper.clip()  # the second skip in a row: allowed
        assert _total(ps) == 0.0
        _set_norm(ps, 1000.0)
        clipper.clip()  # a third is not: clipped instead
        assert _total(ps) > 0.0
    assert a.stats() == b.stats()
    old = a.state_dict()
    for key in ("skipped", "skip_run"):
        del old[key]
    for key in ("skip_z_threshold", "max_consecutive_skips"):
        del old["settings"][key]
    c = AdaptiveClipper(_params(), WARM)
    c.load_state_dict(old)
    assert c.settings == replace(SKIP, skip_z_threshold=10.0, max_consecutive_skips=3)
    assert c.stats().skipped_steps == 0


def test_control_file_carries_skip_settings_and_old_files_get_defaults(tmp_path: Path) -> None:
    """Skip settings (inf = off) round-trip through the control file; a file without them gets defaults."""
    path = tmp_path / "job.control.json"
    off = ClipSettings(skip_z_threshold=math.inf, max_consecutive_skips=5)
    write_control(path, ControlState(job="job", clip=off))
    assert read_control(path).clip == off
    old = '{"version": 1, "job": "job", "clip": {"z_threshold": 2.0, "ema_alpha": 0.9, '
    old += '"warmup_steps": 10, "warmup_max_norm": 1.0}}'
    path.write_text(old)
    clip = read_control(path).clip
    assert clip is not None
    assert (clip.skip_z_threshold, clip.max_consecutive_skips) == (10.0, 3)


def _fused_setup() -> tuple[torch.nn.Linear, torch.optim.AdamW, AdaptiveClipper, torch.Tensor]:
    """A model, a fused AdamW and a clipper after five warm-up steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    clipper = AdaptiveClipper(list(model.parameters()), SKIP)
    x = torch.randn(8, 4)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        clipper.clip()
        clipper.step(opt)
    return model, opt, clipper, x


def test_fused_optimizer_skips_an_outlier_step_entirely() -> None:
    """With a fused AdamW, clipper.step leaves weights, moments and step counts alone on a skipped step."""
    model, opt, clipper, x = _fused_setup()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    opt.zero_grad()
    (1e4 * model(x).square().mean()).backward()
    clipper.clip()
    clipper.step(opt)
    assert clipper.skip_flag is not None
    assert clipper.skip_flag.item() == 1.0
    assert not hasattr(opt, "found_inf")
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(state[k][n], t) for k, v in opt.state.items() for n, t in v.items())
    opt.zero_grad()
    model(x).square().mean().backward()
    clipper.clip()
    clipper.step(opt)  # an ordinary step moves again
    assert clipper.skip_flag.item() == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


@pytest.mark.usefixtures("device_path")
def test_fused_skip_step_never_reads_device_values_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """clip() and clipper.step() with a fused optimizer, skipping or not, never read a tensor on the host."""
    model, opt, clipper, x = _fused_setup()

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("host read of a tensor inside clip()/step()")

    for scale in (1.0, 1e4, 1.0):
        opt.zero_grad()
        loss = scale * model(x).square().mean()
        loss.backward()
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        clipper.clip()
        clipper.step(opt)
        monkeypatch.undo()
    assert clipper.stats().skipped_steps == 1


@pytest.mark.parametrize(
    "change",
    [
        {"step": -1},
        {"warm": [1.0, 2.0]},
        {"mean": float("nan")},
        {"var": -1.0},
        {"var": 10**400},
        {"clipped": -5},
        {"warm": ["x"]},
    ],
)
def test_damaged_clipper_state_is_refused_before_anything_changes(change: dict[str, object]) -> None:
    """A damaged clipper state from a checkpoint raises ClipSettingsError and leaves the clipper as it was."""
    params = _params()
    source = AdaptiveClipper(params, WARM)
    _warm_up(source, params, [1.0, 1.1])
    state = {**source.state_dict(), **change}
    target = AdaptiveClipper(_params(), WARM)
    with pytest.raises(ClipSettingsError, match="clipper state"):
        target.load_state_dict(state)
    assert target.stats().steps == 0


def test_state_after_a_warmup_change_past_the_warmup_still_loads() -> None:
    """A longer warm-up set after the warm-up ended restarts it safely: clip() works, the state loads."""
    params = _params()
    source = AdaptiveClipper(params, WARM)
    _warm_up(source, params, [1.0, 1.1, 0.9, 1.05, 0.95, 1.0])
    assert source.update(replace(WARM, warmup_steps=10))
    _warm_up(source, params, [1.0, 1.1, 0.9, 1.05])
    assert source.warming_up is False
    assert math.isfinite(source.stats().mean)
    target = AdaptiveClipper(_params(), WARM)
    target.load_state_dict(source.state_dict())
    assert target.stats().steps == 10
    assert target.settings.warmup_steps == 10
