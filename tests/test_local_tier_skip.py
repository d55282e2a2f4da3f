"""A local save never waits for the previous write: it is skipped on every rank while any still writes.

The writes are held on an event (the real writer, started late), so which save finds a write in
flight is decided by the test, not by the machine's speed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import trainwarden.client.checkpoint as checkpoint_module
from support import free_port, wait_until
from training_support import collect_into, running_collector
from trainwarden.client.checkpoint import CheckpointManager
from trainwarden.client.checkpoint_staging import HostStaging
from trainwarden.client.reporter import Reporter

LOCAL_SKIPPED = "trainwarden_train_checkpoint_local_skipped_total"

HOLD_S = 120.0
"""Longest a held write waits for its release: only reached when the code under test waited for it."""


class _HeldWrites:
    """Replace `write_private` by one whose first `count` calls wait for `release` (then really write)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch | None, count: int = 1) -> None:
        self.release = threading.Event()
        self.released_in_time: list[bool] = []
        self._left = count
        self._original = getattr(checkpoint_module, "write_private")  # noqa: B009 - not re-exported
        if monkeypatch is not None:
            monkeypatch.setattr(checkpoint_module, "write_private", self)
        else:  # a spawned rank: its own process, nothing to undo
            setattr(checkpoint_module, "write_private", self)  # noqa: B010

    def __call__(self, *args: Any) -> Path:
        if self._left > 0:
            self._left -= 1
            self.released_in_time.append(self.release.wait(HOLD_S))
        written: Path = self._original(*args)
        return written


def _manager(root: Path, **kwargs: Any) -> CheckpointManager:
    settings: dict[str, Any] = {"durable_every": 1000, "local_dir": root / "local", "local_every": 1}
    return CheckpointManager(root / "durable", **(settings | kwargs))


def _steps(paths: list[Path]) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in paths)


def test_a_local_save_due_during_a_write_is_skipped_and_a_durable_one_queues_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the local write of step 0 is held: step 1's requested durable save returns without waiting
    for it, step 2's local save is skipped and counted; once released both checkpoints hold the values
    of their own step, though training changed the tensors in place meanwhile."""
    held = _HeldWrites(monkeypatch)
    manager = _manager(tmp_path, async_save=True)
    weight = torch.zeros(1000)
    state = {"w": weight}
    weight.fill_(1.0)
    assert manager.save(0, state) is not None
    weight.fill_(2.0)
    assert manager.save(1, state, durable=True) == tmp_path / "durable" / "step_0000000001"
    weight.fill_(3.0)
    assert manager.save(2, state) is None
    assert manager.local_skipped == 1
    weight.fill_(4.0)
    held.release.set()
    manager.close()
    assert held.released_in_time == [True], "no save waited for the held write"
    assert (_steps(manager.local_checkpoints()), _steps(manager.checkpoints())) == ([0], [1])
    target = {"w": torch.zeros(1000)}
    resume = _manager(tmp_path).load_latest(target)
    assert resume is not None
    assert (resume.step, resume.tier) == (1, "durable")
    assert torch.equal(target["w"], torch.full((1000,), 2.0))
    shutil.rmtree(tmp_path / "durable" / "step_0000000001")
    resume = _manager(tmp_path).load_latest(target)
    assert resume is not None
    assert (resume.step, resume.tier) == (0, "local")
    assert torch.equal(target["w"], torch.full((1000,), 1.0))


def test_skipped_local_saves_reach_the_daemons_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon exports each rank's count of skipped local saves, sent with its next checkpoint record."""
    held = _HeldWrites(monkeypatch)
    runtime = tmp_path / "run"
    runtime.mkdir()
    with running_collector(runtime) as collector:
        reporter = Reporter(
            job="tiers",
            socket_path=collector.socket_path,
            control_dir=runtime / "control",
            env={"RANK": "0", "WORLD_SIZE": "1"},
            stack_dump=False,
        )
        try:
            manager = _manager(tmp_path, async_save=True, reporter=reporter)
            state = {"w": torch.zeros(100)}
            manager.save(0, state)  # held
            assert manager.save(1, state) is None
            assert manager.save(2, state) is None
            held.release.set()
            manager.wait()
            assert manager.save(3, state) is not None  # the next save carries the count
            manager.close()
            reporter.flush()

            def skipped() -> float | None:
                return collect_into(collector).value(LOCAL_SKIPPED, job="tiers", rank="0")

            wait_until(lambda: skipped() == 2.0, 20.0, "the skip count in the daemon's metrics")
        finally:
            reporter.close()


def test_wait_mode_writes_every_due_local_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With local_when_busy="wait" a local save due during a write waits for it and is written."""
    held = _HeldWrites(monkeypatch)
    manager = _manager(tmp_path, local_when_busy="wait")
    state = {"w": torch.zeros(10)}
    manager.save(0, state)
    releaser = threading.Thread(target=held.release.set)  # the save below can only return after it
    releaser.start()
    assert manager.save(1, state) is not None
    releaser.join()
    manager.close()
    assert manager.local_skipped == 0
    assert _steps(manager.local_checkpoints()) == [0, 1]


def test_staging_reuses_host_buffers_and_drops_those_of_changed_tensors() -> None:
    """A second save into the same slot copies into the same host memory; a tensor that changed shape
    gets a new buffer and the old one is no longer held."""
    staging = HostStaging()
    first = staging.stage({"a": torch.ones(256), "b": [torch.zeros(8)], "n": 3}, 0)
    again = staging.stage({"a": torch.full((256,), 5.0), "b": [torch.zeros(8)], "n": 4}, 0)
    assert again["a"].data_ptr() == first["a"].data_ptr()
    assert torch.equal(again["a"], torch.full((256,), 5.0))
    assert again["n"] == 4
    assert staging.held_bytes() == (256 + 8) * 4
    staging.stage({"a": torch.ones(16, dtype=torch.float64)}, 0)
    assert staging.held_bytes() == 16 * 8
    staging.stage({"a": torch.ones(16)}, 1)
    assert staging.held_bytes() == 16 * 8 + 16 * 4


def _rank(rank: int, port: int, root: Path) -> None:
    """One of two gloo ranks: rank 1's first local write is held while both reach the next save."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    held = _HeldWrites(None, count=1 if rank == 1 else 0)
    manager = _manager(root, local_dir=root / "local" / f"node{rank}")
    state = {"w": torch.full((64,), float(rank))}
    manager.save(0, state)
    if rank == 0:
        manager.wait()  # rank 0 idle: only rank 1 is still writing
    skipped = manager.save(1, state) is None
    held.release.set()
    manager.wait()
    written = manager.save(2, state) is not None
    manager.close()
    resume = _manager(root, local_dir=root / "local" / f"node{rank}").load_latest({"w": torch.zeros(64)})
    result = {
        "skipped": skipped,
        "written": written,
        "local_skipped": manager.local_skipped,
        "local_steps": _steps(manager.local_checkpoints()),
        "resume": None if resume is None else [resume.step, resume.tier],
        "released_in_time": held.released_in_time,
    }
    (root / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_skip_a_local_save_together_when_one_rank_still_writes(tmp_path: Path) -> None:
    """On 2 gloo ranks, rank 1 still writing makes idle rank 0 skip the same local save, so both hold
    the same local steps and resume from the same newest one."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_rank, args=(rank, port, tmp_path)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]
    for result in results:
        assert (result["skipped"], result["written"], result["local_skipped"]) == (True, True, 1), results
        assert result["local_steps"] == [0, 2], results
        assert result["resume"] == [2, "local"], results
    assert results[1]["released_in_time"] == [True]
