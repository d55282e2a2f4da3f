"""The node-local checkpoint tier: frequent, asynchronous, per-rank checkpoints on fast local storage.

Each rank keeps its own directory, ``<local_dir>/rank_00003/step_…``, written by that rank alone
(DCP without a process group, its own manifest listing only its files and its own small state),
so the tier works when ranks sit on different nodes with different ``/dev/shm``. The same
guarantees as the durable tier hold per rank: temp directory, fsync, manifest with sizes and
sha256 of every file, atomic rename, keep-last-N. What the tier cannot do alone, agreement, is
done by `CheckpointManager.load_latest`: a local step is used only when every rank holds a valid
copy of it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from trainwarden.client.checkpoint_store import CheckpointDirectory
from trainwarden.client.manifest import MANIFEST_NAME, CheckpointError, Manifest

log = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")  # noqa: S108 - the node's tmpfs, by design; a directory per user below
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VALIDATED_EXTRA = 2
"""Local candidates validated beyond keep-last (older ones are leftovers, never resumed from)."""


def default_local_dir(job: str) -> Path:
    """``/dev/shm/trainwarden-<uid>/<job>``: the node's tmpfs (RAM), one directory per user and job.

    Per user, so one user's directory never stops another's job from creating its own.
    """
    if not _JOB_NAME.match(job) or ".." in job:
        raise ValueError(f"job={job!r} must be 1-128 of [A-Za-z0-9._-], starting with a letter or digit")
    return SHM_ROOT / f"trainwarden-{os.getuid()}" / job


class LocalTier:
    """One rank's directory of the local tier.

    When a save is due is decided by the manager: every rank decides it, even one whose tier is
    unusable, because the ranks agree at every due local save.
    """

    def __init__(self, local_dir: Path, *, rank: int, world_size: int, every: int, keep_last: int) -> None:
        if every < 1:
            raise ValueError(f"local_every={every} must be >= 1")
        if keep_last < 1:
            raise ValueError(f"local_keep_last={keep_last} must be >= 1")
        self.every = every
        self.rank = rank
        self.world_size = world_size
        self.directory = CheckpointDirectory(local_dir / f"rank_{rank:05d}", keep_last=keep_last)

    def create(self) -> None:
        """Create this rank's directory (only its owner may read it); OSError when the storage can't."""
        self.directory.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def valid(self, reject: Callable[[CheckpointError], None]) -> dict[int, tuple[Path, Manifest]]:
        """Every newest local checkpoint of this rank that validates fully, by step; others rejected."""
        found: dict[int, tuple[Path, Manifest]] = {}
        limit = self.directory.keep_last + _VALIDATED_EXTRA
        for step, path in self.directory.candidates()[:limit]:
            try:
                manifest = self.directory.validate(path)
                self._check_owner(path, manifest)
            except CheckpointError as exc:
                reject(exc)
                continue
            found[step] = (path, manifest)
        return found

    def _check_owner(self, path: Path, manifest: Manifest) -> None:
        owners = [r.rank for r in manifest.ranks]
        if manifest.world_size != self.world_size or owners != [self.rank]:
            raise CheckpointError(
                path / MANIFEST_NAME,
                "foreign",
                f"local checkpoint of rank(s) {owners} in a world of {manifest.world_size}; "
                f"this is rank {self.rank} of {self.world_size}",
            )

    def discard_newer(self, step: int) -> None:
        """Remove local checkpoints after `step`: the job resumed before them, on another timeline."""
        for found, path in self.directory.candidates():
            if found > step:
                log.info("discarding local checkpoint %s (resumed at step %d)", path, step)
                shutil.rmtree(path, ignore_errors=True)
