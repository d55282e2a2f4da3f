"""CheckpointManager in one process: atomic saves, validation, fallback, formats, pruning, async."""

# NumPy's legacy global generator is exactly what the checkpoint must capture and restore.
# ruff: noqa: NPY002

from __future__ import annotations

import contextlib
import json
import pickle
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    body_checksum,
    read_manifest,
)


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"train": ModelOptimizerState(model, opt)}


def _saved(root: Path, steps: list[int], **kwargs: Any) -> tuple[CheckpointManager, torch.nn.Module]:
    model, opt = _model()
    manager = CheckpointManager(root, keep_last=10, **kwargs)
    for step in steps:
        _train(model, opt, 1)
        manager.save(step, _state(model, opt), data_position={"batch": step + 1})
    return manager, model


def _shard(checkpoint: Path) -> Path:
    return next((checkpoint / "state").glob("*.distcp"))


def _rewrite_manifest(checkpoint: Path, edit: Any) -> None:
    path = checkpoint / MANIFEST_NAME
    body = json.loads(path.read_text())
    edit(body)
    body["checksum"] = body_checksum(body)
    path.write_text(json.dumps(body))


def test_round_trip_restores_tensors_optimizer_rng_and_position(tmp_path: Path) -> None:
    """Loading restores parameters, optimizer moments, the three global RNGs, data position and extras."""
    model, opt = _model(1)
    _train(model, opt)
    manager = CheckpointManager(tmp_path)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    manager.save(7, _state(model, opt), data_position={"epoch": 1, "index": 3}, extras={"run": "a"})
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    expected_exp_avg = opt.state_dict()["state"][0]["exp_avg"].clone()

    fresh, fresh_opt = _model(2)
    resume = CheckpointManager(tmp_path).load_latest(_state(fresh, fresh_opt))
    assert resume is not None
    assert (resume.step, resume.data_position, dict(resume.extras)) == (
        7,
        {"epoch": 1, "index": 3},
        {"run": "a"},
    )
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], expected_exp_avg)
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_layout_has_manifest_with_checksums_of_every_file(tmp_path: Path) -> None:
    """A saved checkpoint is a DCP directory plus a manifest listing every file's size and sha256."""
    manager, _ = _saved(tmp_path, [3])
    path = tmp_path / "step_0000000003"
    manifest = read_manifest(path)
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest.files) == on_disk
    assert "state/.metadata" in on_disk
    assert manifest.step == 3
    assert manifest.world_size == 1
    assert {"python", "numpy", "torch"} <= set(manifest.ranks[0].rng)
    assert manager.validate(path).step == 3


def test_failure_inside_write_leaves_previous_checkpoint_and_no_new_one(tmp_path: Path) -> None:
    """An error after the shards are written and before the manifest leaves no loadable new checkpoint."""
    manager, _ = _saved(tmp_path, [1])

    def boom(_tmp: Path) -> None:
        raise OSError("disk full (simulated)")

    model, opt = _model()
    failing = CheckpointManager(tmp_path, on_written=boom)
    with pytest.raises(OSError, match="disk full"):
        failing.save(2, _state(model, opt))
    assert failing.failed_saves == 1
    assert (tmp_path / ".tmp-step_0000000002" / "state").is_dir()
    assert [p.name for p in manager.checkpoints()] == ["step_0000000001"]
    resume = CheckpointManager(tmp_path).load_latest(_state(*_model()))
    assert resume is not None
    assert resume.step == 1
    manager.save(3, _state(model, opt))
    assert not (tmp_path / ".tmp-step_0000000002").exists(), "a later save cleans up the torn temp dir"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip_shard", "checksum"),
        ("truncate_shard", "truncated"),
        ("delete_shard", "missing_file"),
        ("empty_manifest", "truncated"),
        ("garbled_manifest", "not_json"),
        ("no_manifest", "missing_manifest"),
        ("foreign_manifest", "foreign"),
        ("edited_manifest", "checksum"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path: Path, damage: str, reason: str) -> None:
    """Each kind of damage to the newest checkpoint is rejected with its reason and the previous one loads."""
    manager, _ = _saved(tmp_path, [10, 20])
    newest = tmp_path / "step_0000000020"
    shard, manifest = _shard(newest), newest / MANIFEST_NAME
    if damage == "flip_shard":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(data)
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif damage == "delete_shard":
        shard.unlink()
    elif damage == "empty_manifest":
        manifest.write_text("")
    elif damage == "garbled_manifest":
        manifest.write_text(manifest.read_text()[:-40])
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "foreign_manifest":
        manifest.write_text(json.dumps({"name": "some other tool", "version": 3}))
    elif damage == "edited_manifest":
        manifest.write_text(manifest.read_text().replace('"step": 20', '"step": 21'))
    with pytest.raises(CheckpointError) as info:
        manager.validate(newest)
    assert info.value.reason == reason
    assert str(newest) in str(info.value), "the error names the file"

    loader = CheckpointManager(tmp_path)
    resume = loader.load_latest(_state(*_model()))
    assert resume is not None
    assert resume.step == 10
    assert resume.data_position == {"batch": 11}
    assert loader.rejected == {reason: 1}


def test_nothing_valid_returns_none(tmp_path: Path) -> None:
    """With only broken checkpoints and unrelated entries, load_latest says there is nothing to resume."""
    _saved(tmp_path, [5])
    (tmp_path / "step_0000000005" / MANIFEST_NAME).write_text("{")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "step_0000000009").write_text("a file, not a directory")
    (tmp_path / "other_dir").mkdir()
    loader = CheckpointManager(tmp_path)
    assert loader.load_latest(_state(*_model())) is None
    assert loader.rejected == {"not_json": 1}
    assert CheckpointManager(tmp_path / "absent").load_latest(_state(*_model())) is None


def test_format_1_manifest_is_migrated(tmp_path: Path) -> None:
    """A format-1 manifest (one process, top-level RNG and data position, no sizes) loads via migration."""
    _saved(tmp_path, [4])
    path = tmp_path / "step_0000000004"

    def to_v1(body: dict[str, Any]) -> None:
        rank = body.pop("ranks")[0]
        body["files"] = {k: v["sha256"] for k, v in body["files"].items()}
        body.update(format_version=1, rng=rank["rng"], data_position=rank["data_position"])
        for key in ("world_size", "metric", "torch_version"):
            body.pop(key)

    _rewrite_manifest(path, to_v1)
    manifest = read_manifest(path)
    assert manifest.migrated_from == 1
    assert manifest.world_size == 1
    resume = CheckpointManager(tmp_path).load_latest(_state(*_model()))
    assert resume is not None
    assert (resume.step, resume.data_position) == (4, {"batch": 5})


def test_newer_format_is_refused_with_a_message_saying_so(tmp_path: Path) -> None:
    """A manifest from a newer trainwarden is refused (not guessed at) and resume falls back."""
    manager, _ = _saved(tmp_path, [1, 2])
    newest = tmp_path / "step_0000000002"
    _rewrite_manifest(newest, lambda body: body.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=r"newer than this trainwarden supports.*upgrade") as info:
        manager.validate(newest)
    assert info.value.reason == "newer_version"
    resume = CheckpointManager(tmp_path).load_latest(_state(*_model()))
    assert resume is not None
    assert resume.step == 1


def test_keep_last_n_plus_best(tmp_path: Path) -> None:
    """Pruning keeps the newest N checkpoints and the best one by metric, and deletes the rest."""
    model, opt = _model()
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=1, best_mode="min")
    for step, loss in [(1, 0.9), (2, 0.2), (3, 0.5), (4, 0.6), (5, 0.7), (6, 0.8)]:
        manager.save(step, _state(model, opt), metric=loss)
    assert [p.name for p in manager.checkpoints()] == [
        "step_0000000006",
        "step_0000000005",
        "step_0000000002",
    ]
    maximiser = CheckpointManager(tmp_path / "max", keep_last=1, keep_best=1, best_mode="max")
    for step, acc in [(1, 0.1), (2, 0.9), (3, 0.3)]:
        maximiser.save(step, _state(model, opt), metric=acc)
    assert [p.name for p in maximiser.checkpoints()] == ["step_0000000003", "step_0000000002"]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    """Saving a step that already exists (after falling back past a corrupt one) replaces it whole."""
    manager = CheckpointManager(tmp_path)
    manager.save(3, {"t": torch.zeros(2)})
    manager.save(3, {"t": torch.ones(2)})
    target = {"t": torch.empty(2)}
    assert manager.load_latest(target) is not None
    assert torch.equal(target["t"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000000003"]


def test_async_save_snapshots_state_at_call_time(tmp_path: Path) -> None:
    """An async save writes the values of save() time even if training changes them during the write."""
    release = threading.Event()
    manager = CheckpointManager(tmp_path, async_save=True, on_written=lambda _p: release.wait(10))
    weights = {"w": torch.arange(4.0)}
    path = manager.save(1, weights)
    weights["w"].add_(100.0)  # training goes on while the thread writes
    assert not path.exists()
    release.set()
    assert manager.wait() == path
    target = {"w": torch.empty(4)}
    assert CheckpointManager(tmp_path).load_latest(target) is not None
    assert torch.equal(target["w"], torch.arange(4.0))


def test_async_never_two_in_flight(tmp_path: Path) -> None:
    """A second async save waits for the first, so two writes never overlap."""
    active, peak, lock = [0], [0], threading.Lock()

    def slow(_tmp: Path) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1

    manager = CheckpointManager(tmp_path, async_save=True, on_written=slow)
    for step in range(3):
        manager.save(step, {"w": torch.full((2,), float(step))})
    manager.wait()
    assert peak[0] == 1
    assert [p.name for p in manager.checkpoints()] == [f"step_{s:010d}" for s in (2, 1, 0)]


def test_async_failure_is_raised_by_wait(tmp_path: Path) -> None:
    """A failed background write surfaces as a CheckpointError from wait(), naming the checkpoint."""

    def boom(_tmp: Path) -> None:
        raise OSError("no space left on device")

    manager = CheckpointManager(tmp_path, async_save=True, on_written=boom)
    manager.save(1, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"step_0000000001.*no space left") as info:
        manager.wait()
    assert info.value.reason == "save_failed"
    assert manager.failed_saves == 1


def test_reporter_sees_checkpoint_phase_and_saved_record(tmp_path: Path) -> None:
    """With a reporter, saving runs inside phase("checkpoint") and reports checkpoint_saved(step, path)."""
    calls: list[tuple[Any, ...]] = []

    class Recorder:
        @contextlib.contextmanager
        def phase(self, name: str) -> Iterator[None]:
            calls.append(("begin", name))
            yield
            calls.append(("end", name))

        def checkpoint_saved(self, step: int, path: str, seconds: float | None = None) -> None:
            calls.append(("saved", step, path, seconds is not None))

    manager = CheckpointManager(tmp_path, reporter=Recorder())
    manager.save(8, {"w": torch.zeros(1)})
    assert calls == [
        ("begin", "checkpoint"),
        ("saved", 8, str(tmp_path / "step_0000000008"), True),
        ("end", "checkpoint"),
    ]


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    """Non-JSON extras, negative steps and bad retention settings are refused with what is wrong."""
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="extras must be JSON-able"):
        manager.save(1, {"w": torch.zeros(1)}, extras={"t": object()})
    with pytest.raises(ValueError, match="step=-1"):
        manager.save(-1, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_checkpoint_error_survives_pickling() -> None:
    """CheckpointError crosses process boundaries (object collectives) with its fields intact."""
    err = pickle.loads(pickle.dumps(CheckpointError("/x/manifest.json", "checksum", "mismatch")))
    assert (err.path, err.reason, err.detail) == (Path("/x/manifest.json"), "checksum", "mismatch")
