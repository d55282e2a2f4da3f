"""Checkpoint loading never blocks, raises or loads damaged state; saving never writes NaN/Inf state."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState, ResumePoint
from trainwarden.client.manifest import MANIFEST_NAME, body_checksum


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(3, 4)).pow(2).mean().backward()
    opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _two_checkpoints(root: Path) -> dict[int, list[torch.Tensor]]:
    """Steps 1 and 2 of one model, and the parameters each holds."""
    model, opt = _model()
    manager = CheckpointManager(root, keep_last=5)
    saved = {}
    for step in (1, 2):
        _train(model, opt)
        manager.save(step, {"train": ModelOptimizerState(model, opt)}, data_position={"batch": step})
        saved[step] = _params(model)
    return saved


def _load(root: Path) -> tuple[CheckpointManager, ResumePoint | None, list[torch.Tensor]]:
    model, opt = _model(seed=9)
    loader = CheckpointManager(root)
    resume = loader.load_latest({"train": ModelOptimizerState(model, opt)})
    return loader, resume, _params(model)


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` on a thread; fail (instead of hanging the suite) if it blocks."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout=60.0)
    assert not thread.is_alive(), "blocked"
    return box[0]


def _edit_manifest(checkpoint: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = checkpoint / MANIFEST_NAME
    body = json.loads(path.read_text())
    edit(body)
    body["checksum"] = body_checksum(body)
    path.write_text(json.dumps(body))


NEWEST = "step_0000000002"


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_manifest_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    """A FIFO, a symlink to /dev/zero or a directory as manifest.json is refused at once; the older loads."""
    saved = _two_checkpoints(tmp_path)
    manifest = tmp_path / NEWEST / MANIFEST_NAME
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "dev_zero":
        manifest.symlink_to("/dev/zero")
    else:
        manifest.mkdir()
    loader, resume, params = _in_thread(lambda: _load(tmp_path))
    assert resume is not None
    assert resume.step == 1
    assert _same(params, saved[1])
    assert loader.rejected == {"unreadable": 1}


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"kind": "trainwarden-checkpoint", "format_version": ' + "9" * 5000 + "}",
    ],
    ids=["depth_bomb", "number_bomb"],
)
def test_json_bombs_are_refusals(tmp_path: Path, text: str) -> None:
    """A JSON depth bomb or a 5,000-digit number in the manifest is refused as not_json, never raised."""
    _two_checkpoints(tmp_path)
    (tmp_path / NEWEST / MANIFEST_NAME).write_text(text)
    loader, resume, _ = _load(tmp_path)
    assert resume is not None
    assert resume.step == 1
    assert loader.rejected == {"not_json": 1}


@pytest.mark.parametrize("step", [math.inf, 2.0, "2", True, -2, 10**10])
def test_step_must_be_an_integer_in_range(tmp_path: Path, step: object) -> None:
    """step Infinity, 2.0, "2", true, negative or beyond the directory format is a malformed manifest."""
    _two_checkpoints(tmp_path)
    _edit_manifest(tmp_path / NEWEST, lambda body: body.update(step=step))
    loader, resume, _ = _load(tmp_path)
    assert resume is not None
    assert resume.step == 1
    assert loader.rejected == {"malformed": 1}


def test_a_shard_the_manifest_omits_is_a_refusal_not_a_silent_load(tmp_path: Path) -> None:
    """A corrupted shard the manifest does not list is refused (unlisted_file); the previous one loads."""
    saved = _two_checkpoints(tmp_path)
    newest = tmp_path / NEWEST
    shard = next((newest / "state").glob("*.distcp"))
    rel = shard.relative_to(newest).as_posix()
    _edit_manifest(newest, lambda body: body["files"].pop(rel))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    loader, resume, params = _load(tmp_path)
    assert resume is not None
    assert resume.step == 1
    assert _same(params, saved[1])
    assert loader.rejected == {"unlisted_file": 1}


@pytest.mark.parametrize("kind", ["extra_file", "symlink", "fifo"])
def test_anything_extra_in_a_checkpoint_is_a_refusal(tmp_path: Path, kind: str) -> None:
    """An extra file, a symlink or a FIFO inside a checkpoint directory makes it refused."""
    _two_checkpoints(tmp_path)
    extra = tmp_path / NEWEST / "state" / "__1_0.distcp"
    if kind == "extra_file":
        extra.write_bytes(b"x")
    elif kind == "symlink":
        extra.symlink_to("/dev/zero")
    else:
        os.mkfifo(extra)
    loader, resume, _ = _in_thread(lambda: _load(tmp_path))
    assert resume is not None
    assert resume.step == 1
    assert loader.rejected == {"unlisted_file" if kind == "extra_file" else "not_regular": 1}


def test_changed_model_shapes_are_a_load_failed_refusal_with_fallback(tmp_path: Path) -> None:
    """DCP's CheckpointException (a BaseException) is caught: load_failed, then the previous one loads."""
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"w": torch.arange(3.0)})
    manager.save(2, {"w": torch.arange(5.0)})
    target = {"w": torch.zeros(3)}
    loader = CheckpointManager(tmp_path)
    resume = loader.load_latest(target)
    assert resume is not None
    assert resume.step == 1
    assert torch.equal(target["w"], torch.arange(3.0))
    assert loader.rejected == {"load_failed": 1}
    other = CheckpointManager(tmp_path)
    assert other.load_latest({"w": torch.zeros(7)}) is None
    assert other.rejected == {"load_failed": 2}


@pytest.mark.parametrize(
    "garbage",
    [
        {"python": {"version": 3, "state": [1, 2, 3], "gauss": None}},
        {"torch": "!!not base64!!"},
        {"torch": "AAAA"},
        {"numpy": {"name": "MT19937", "keys": [2**40], "pos": 0, "has_gauss": 0, "cached_gaussian": 0.0}},
        {"python": "nonsense"},
    ],
)
def test_garbage_rng_state_is_refused_before_anything_is_loaded(
    tmp_path: Path, garbage: dict[str, Any]
) -> None:
    """Unusable RNG states refuse the checkpoint before any tensor or generator changes; the older loads."""
    saved = _two_checkpoints(tmp_path)
    _edit_manifest(tmp_path / NEWEST, lambda body: body["ranks"][0]["rng"].update(garbage))
    model, opt = _model(seed=9)
    loader = CheckpointManager(tmp_path)
    seen: list[list[torch.Tensor]] = []
    original = loader._dcp_load

    def spy(state: Any, path: Path) -> Any:
        seen.append(_params(model))
        return original(state, path)

    loader._dcp_load = spy  # type: ignore[method-assign]
    resume = loader.load_latest({"train": ModelOptimizerState(model, opt)})
    assert resume is not None
    assert resume.step == 1
    assert loader.rejected == {"bad_rng": 1}
    assert len(seen) == 1, "DCP ran only for the checkpoint that was loaded"
    assert _same(_params(model), saved[1])


@pytest.mark.parametrize("where", ["parameter", "optimizer", "plain_tensor"])
def test_save_refuses_non_finite_state_and_writes_nothing(tmp_path: Path, where: str) -> None:
    """A NaN/Inf in parameters, optimizer moments or a plain tensor: save returns None and writes nothing."""
    model, opt = _model()
    manager = CheckpointManager(tmp_path)
    _train(model, opt)
    assert manager.save(1, {"train": ModelOptimizerState(model, opt)}) is not None
    extra = torch.ones(2)
    with torch.no_grad():
        if where == "parameter":
            next(model.parameters())[0, 0] = math.nan
        elif where == "optimizer":
            next(iter(opt.state.values()))["exp_avg_sq"].fill_(math.inf)
        else:
            extra[1] = -math.inf
    assert manager.save(2, {"train": ModelOptimizerState(model, opt), "extra": extra}) is None
    assert manager.refused_saves == 1
    assert manager.last_refusal is not None
    assert manager.last_refusal.reason == "nonfinite"
    name = {"parameter": "train.model.0.weight", "optimizer": "exp_avg_sq", "plain_tensor": "extra"}[where]
    assert name in str(manager.last_refusal)
    assert [p.name for p in manager.checkpoints()] == ["step_0000000001"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_async_save_also_refuses_and_a_buffer_with_inf_is_allowed(tmp_path: Path) -> None:
    """The async path refuses NaN parameters too, while a module buffer holding -inf (a mask) saves."""
    model, opt = _model()
    model.register_buffer("mask", torch.tensor([0.0, -math.inf]))
    manager = CheckpointManager(tmp_path, async_save=True)
    assert manager.save(1, {"train": ModelOptimizerState(model, opt)}, metric=math.nan) is not None
    assert manager.wait() == tmp_path / "step_0000000001"
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    assert manager.save(2, {"train": ModelOptimizerState(model, opt)}) is None
    assert manager.wait() is None
    assert [p.name for p in manager.checkpoints()] == ["step_0000000001"]
    assert manager.validate(tmp_path / "step_0000000001").metric is None


def test_large_finite_values_are_saved_even_when_their_norm_overflows(tmp_path: Path) -> None:
    """Finite values whose norm overflows (1e20 in float32, 60000 in float16) are not mistaken for Inf."""
    manager = CheckpointManager(tmp_path)
    state = {"big": torch.full((4,), 1e20), "half": torch.full((3,), 60000.0, dtype=torch.float16)}
    assert manager.save(1, state) == tmp_path / "step_0000000001"
    assert manager.refused_saves == 0
