"""The local checkpoint tier in one process: which tier a save goes to, bounds, refusals, failures."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import trainwarden.client.checkpoint as checkpoint_module
from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState, default_local_dir
from trainwarden.client.checkpoint_local import LocalTier
from trainwarden.client.manifest import CheckpointError


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 6)).pow(2).mean().backward()
    opt.step()


def _manager(tmp_path: Path, **kwargs: Any) -> CheckpointManager:
    """Local every 2, durable every 6; a local save waits for the previous write, so which steps are
    written does not depend on how fast the machine writes (the skipping default is tested below)."""
    settings: dict[str, Any] = {
        "local_dir": tmp_path / "local",
        "local_every": 2,
        "durable_every": 6,
        "local_when_busy": "wait",
    }
    return CheckpointManager(tmp_path / "durable", **(settings | kwargs))


def _steps(paths: list[Path]) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in paths)


def test_one_save_per_step_goes_to_the_tier_that_is_due(tmp_path: Path) -> None:
    """With local every 2 and durable every 6, steps 1,3,7,9 go local, 5 and 11 durable, the rest nowhere;
    durable=True writes the durable tier at once."""
    model, opt = _model()
    manager = _manager(tmp_path, local_keep_last=10)
    state = {"train": ModelOptimizerState(model, opt)}
    returned = {}
    for step in range(12):
        _train(model, opt)
        returned[step] = manager.save(step, state)
    assert manager.save(12, state, durable=True) == tmp_path / "durable" / "step_0000000012"
    manager.close()
    assert [s for s, path in returned.items() if path is None] == [0, 2, 4, 6, 8, 10]
    assert _steps(manager.checkpoints()) == [5, 11, 12]
    assert _steps(manager.local_checkpoints()) == [1, 3, 7, 9]
    assert all(p.parent == tmp_path / "local" / "rank_00000" for p in manager.local_checkpoints())


def test_local_tier_keeps_only_the_newest_two_and_no_leftovers(tmp_path: Path) -> None:
    """After twenty local saves the tier holds exactly the newest two checkpoints and no temp directory."""
    model, opt = _model()
    manager = _manager(tmp_path, local_every=1, durable_every=1000)
    for step in range(20):
        _train(model, opt)
        manager.save(step, {"train": ModelOptimizerState(model, opt)})
    manager.close()
    assert _steps(manager.local_checkpoints()) == [18, 19]
    assert sorted(p.name for p in (tmp_path / "local" / "rank_00000").iterdir()) == [
        "step_0000000018",
        "step_0000000019",
    ]


def test_resume_takes_the_local_checkpoint_newer_than_the_durable_one_exactly(tmp_path: Path) -> None:
    """Parameters, optimizer moments, RNG and data position come back from the newest (local) step."""
    model, opt = _model()
    manager = _manager(tmp_path)
    for step in range(10):
        _train(model, opt)
        manager.save(step, {"train": ModelOptimizerState(model, opt)}, data_position={"next": step + 1})
    manager.close()
    expected_rng = torch.rand(3)
    fresh, fresh_opt = _model(seed=7)
    resume = _manager(tmp_path).load_latest({"train": ModelOptimizerState(fresh, fresh_opt)})
    assert resume is not None
    assert (resume.step, resume.tier, resume.data_position) == (9, "local", {"next": 10})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_rng)


def test_durable_resume_discards_newer_local_copies(tmp_path: Path) -> None:
    """When the local copies cannot be used, resuming from the durable step removes every newer local one."""
    model, opt = _model()
    manager = _manager(tmp_path)
    for step in range(10):
        _train(model, opt)
        manager.save(step, {"train": ModelOptimizerState(model, opt)})
    manager.close()
    for shard in (tmp_path / "local").rglob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:-1])
    loader = _manager(tmp_path)
    resume = loader.load_latest({"train": ModelOptimizerState(*_model())})
    assert resume is not None
    assert (resume.step, resume.tier) == (5, "durable")
    assert loader.rejected == {"truncated": 2}
    assert loader.local_checkpoints() == []


def test_non_finite_state_is_never_saved_locally(tmp_path: Path) -> None:
    """A NaN in a parameter refuses the local save: nothing is written, the refusal is counted and named."""
    model, opt = _model()
    manager = _manager(tmp_path, durable_every=1000)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    assert manager.save(1, {"train": ModelOptimizerState(model, opt)}) is None
    manager.close()
    assert manager.refused_saves == 1
    assert manager.last_refusal is not None
    assert manager.last_refusal.reason == "nonfinite"
    assert manager.local_checkpoints() == []


def test_another_ranks_local_copy_is_refused_as_foreign(tmp_path: Path) -> None:
    """A local copy written by rank 0 moved into rank 3's directory is never loaded as rank 3's own."""
    model, opt = _model()
    manager = _manager(tmp_path, durable_every=1000)
    _train(model, opt)
    manager.save(1, {"train": ModelOptimizerState(model, opt)})
    manager.close()
    (tmp_path / "local" / "rank_00000").rename(tmp_path / "local" / "rank_00003")
    tier = LocalTier(tmp_path / "local", rank=3, world_size=4, every=1, keep_last=2)
    rejected: list[CheckpointError] = []
    assert tier.valid(rejected.append) == {}
    assert [e.reason for e in rejected] == ["foreign"]


def test_local_save_returns_before_its_write_and_a_failed_write_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local save returns while its write is still blocked; a write that fails is counted, raised by
    wait(), and the next save still works."""
    release = threading.Event()
    original = checkpoint_module.write_private

    def blocked_then_failing(*args: Any) -> Path:
        release.wait(30)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint_module, "write_private", blocked_then_failing)
    model, opt = _model()
    manager = _manager(tmp_path, durable_every=1000)
    state = {"train": ModelOptimizerState(model, opt)}
    assert manager.save(1, state) is not None
    assert manager.failed_saves == 0, "the write has not run yet: save() did not wait for it"
    release.set()
    with pytest.raises(CheckpointError, match="asynchronous save failed") as caught:
        manager.wait()
    assert caught.value.reason == "save_failed"
    assert manager.failed_saves == 1
    monkeypatch.setattr(checkpoint_module, "write_private", original)
    assert manager.save(3, state) is not None
    manager.close()
    assert _steps(manager.local_checkpoints()) == [3]


def test_default_local_dir_is_per_job_on_the_node_tmpfs() -> None:
    """The default local directory is /dev/shm/trainwarden-<uid>/<job>; a name that escapes it is refused."""
    assert default_local_dir("llm-7b.run_2") == Path(f"/dev/shm/trainwarden-{os.getuid()}/llm-7b.run_2")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="job="):
            default_local_dir(bad)


def test_unusable_local_storage_leaves_the_durable_tier_working(tmp_path: Path) -> None:
    """A local directory that cannot be created (a file in the way) is reported, and saves and resume
    go on through the durable tier."""
    (tmp_path / "blocked").write_text("not a directory")
    model, opt = _model()
    manager = _manager(tmp_path, local_dir=tmp_path / "blocked" / "job", durable_every=2)
    assert isinstance(manager.local_tier_error, OSError)
    for step in range(4):
        _train(model, opt)
        manager.save(step, {"train": ModelOptimizerState(model, opt)})
    manager.close()
    assert _steps(manager.checkpoints()) == [1, 3]
    loader = _manager(tmp_path, local_dir=tmp_path / "blocked" / "job")
    resume = loader.load_latest({"train": ModelOptimizerState(*_model())})
    assert resume is not None
    assert (resume.step, resume.tier) == (3, "durable")
