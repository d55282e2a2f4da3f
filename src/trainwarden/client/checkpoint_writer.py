"""Writing one checkpoint: the save job captured at the step boundary, and the write itself.

A coordinated write (every rank in the checkpoint group): the shards go through DCP's
``FileSystemWriter`` into the temp directory (files fsynced), rank 0 gathers every rank's small
state, hashes every file and publishes. `SaveThread` runs the writes off the step path, in order.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.client import rng
from trainwarden.client.checkpoint_group import CheckpointGroup
from trainwarden.client.checkpoint_state import json_copy, quiet_single_process, resolve_state
from trainwarden.client.checkpoint_store import STATE_DIR, CheckpointDirectory
from trainwarden.client.manifest import FileEntry, Manifest, RankState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SaveJob:
    """One save, captured at the step boundary (for async saves, `state` is a CPU copy)."""

    step: int
    state: dict[str, Any]
    rank_state: dict[str, Any]
    extras: dict[str, Any]
    metric: float | None
    started: float


@dataclass(frozen=True, slots=True)
class SaveInputs:
    """What `save` takes besides the tensors: small values that go into the manifest as JSON."""

    data_position: Any = None
    extras: Mapping[str, Any] | None = None
    local: Mapping[str, Any] | None = None
    metric: float | None = None


def capture(step: int, state: Mapping[str, Any], rank: int, inputs: SaveInputs, started: float) -> SaveJob:
    """Capture one save at the step boundary (the tensors still live, not copied)."""
    rank_state = {
        "rank": rank,
        "rng": rng.capture(),
        "data_position": json_copy(inputs.data_position, "data_position"),
        "local": json_copy(dict(inputs.local or {}), "local"),
    }
    extras = json_copy(dict(inputs.extras or {}), "extras")
    metric = inputs.metric
    metric_value = None if metric is None or not math.isfinite(float(metric)) else float(metric)
    return SaveJob(step, resolve_state(state), rank_state, extras, metric_value, started)


def build_manifest(
    job: SaveJob, files: dict[str, FileEntry], ranks: list[dict[str, Any]], world_size: int
) -> Manifest:
    """The manifest of `job` listing `files` and the small state of `ranks`."""
    import torch  # noqa: PLC0415

    return Manifest(
        step=job.step,
        world_size=world_size,
        files=files,
        ranks=tuple(
            RankState(r["rank"], r["rng"], r["data_position"], r["local"])
            for r in sorted(ranks, key=lambda r: int(r["rank"]))
        ),
        extras=job.extras,
        metric=job.metric,
        created_at=time.time(),
        torch_version=torch.__version__,
    )


def write_coordinated(
    job: SaveJob,
    directory: CheckpointDirectory,
    group: CheckpointGroup,
    on_written: Callable[[Path], None] | None,
) -> Path:
    """Every rank writes its shard of `job`; rank 0 publishes. Returns the final path."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # noqa: PLC0415

    tmp, final = directory.temp(job.step), directory.final(job.step)
    if group.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    group.barrier()
    writer = FileSystemWriter(tmp / STATE_DIR, sync_files=True)
    with quiet_single_process():
        dcp_save(job.state, storage_writer=writer, process_group=group.group, no_dist=not group.distributed)
    if on_written is not None:
        on_written(tmp)
    ranks = group.gather(job.rank_state)
    if group.rank == 0:
        manifest = build_manifest(job, directory.hash_files(tmp), ranks, group.world_size)
        directory.publish(tmp, final, manifest)
    group.barrier()
    return final


class SaveThread:
    """Writes on a thread, in order: one running and at most one queued behind it.

    A write started while another is in flight waits for it on its own thread, so the caller
    does not; the caller bounds the queue (`CheckpointManager` queues only a durable write behind
    a local one). The first error of the background writes is kept for `take_error`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.pending: Path | None = None
        """Final path of the newest write started and not yet joined (None when idle)."""
        self.coordinated = False
        """A write that uses the checkpoint group is queued or running (joined: False)."""
        self.slot = 0
        """The staging slot of the newest write started: its buffers stay busy until it ends."""

    @property
    def busy(self) -> bool:
        """True while a write started here is still running or queued."""
        return self._thread is not None and self._thread.is_alive()

    def start(
        self, write: Callable[[], object], pending: Path, name: str, *, slot: int, coordinated: bool
    ) -> None:
        """Run `write` on a new thread, after the write in flight (if any) has ended."""
        previous = self._thread if self.busy else None
        self.pending = pending
        self.slot = slot
        self.coordinated = coordinated or (previous is not None and self.coordinated)
        self._thread = threading.Thread(target=self._run, args=(write, previous), name=name)
        self._thread.start()

    def _run(self, write: Callable[[], object], previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        try:
            write()
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            log.exception("asynchronous checkpoint save failed")

    def join(self) -> None:
        """Wait for every write started, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.pending = None
            self.coordinated = False

    def take_error(self) -> BaseException | None:
        """The first error of the background writes since the last call (cleared)."""
        error, self._error = self._error, None
        return error


def write_private(job: SaveJob, directory: CheckpointDirectory, world_size: int) -> Path:
    """Write and publish `job` from this rank alone into its own `directory` (no collective).

    The node-local tier: every rank has a directory of its own, so ranks on other nodes (other
    ``/dev/shm``) never need each other's files. A failed write removes its temp directory, so a
    full tmpfs does not fill up further.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # noqa: PLC0415

    tmp, final = directory.temp(job.step), directory.final(job.step)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        writer = FileSystemWriter(tmp / STATE_DIR, sync_files=True)
        with quiet_single_process():
            dcp_save(job.state, storage_writer=writer, no_dist=True)
        manifest = build_manifest(job, directory.hash_files(tmp), [job.rank_state], world_size)
        directory.publish(tmp, final, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
