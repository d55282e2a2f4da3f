"""What a resume hands back to the training loop, built from a checkpoint's manifest for one rank.

A rank's RNG states and data position are restored only when the world size is unchanged; the
RNG state is decoded into scratch generators first, so a damaged one refuses the checkpoint
before anything is changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainwarden.client import rng
from trainwarden.client.manifest import MANIFEST_NAME, CheckpointError, Manifest

log = logging.getLogger(__name__)

Tier = Literal["durable", "local"]


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where to resume: the step saved, this rank's data position and the saved extras."""

    step: int
    path: Path
    data_position: Any
    extras: Mapping[str, Any]
    local: Mapping[str, Any]
    manifest: Manifest = field(repr=False)
    tier: Tier = "durable"
    """Which tier it came from: the shared durable root or this node's local tier."""


def prepared_rng(path: Path, manifest: Manifest, rank: int, world_size: int) -> rng.PreparedRng | None:
    """The saved RNG state of `rank`, decoded and checked; None when it is not restored."""
    mine = manifest.rank_state(rank) if manifest.world_size == world_size else None
    if mine is None:
        return None
    try:
        return rng.prepare(mine.rng)
    except rng.RngStateError as exc:
        raise CheckpointError(path / MANIFEST_NAME, "bad_rng", f"rank {rank}: {exc}") from exc


def resume_point(path: Path, manifest: Manifest, rank: int, world_size: int, tier: Tier) -> ResumePoint:
    """The `ResumePoint` of `rank` in the checkpoint at `path` (logged)."""
    mine = manifest.rank_state(rank) if manifest.world_size == world_size else None
    if mine is None:
        log.warning(
            "checkpoint %s was saved with world size %d, now %d: RNG states and data positions "
            "are not restored",
            path,
            manifest.world_size,
            world_size,
        )
    if manifest.migrated_from is not None:
        log.info("checkpoint %s migrated from format %d", path, manifest.migrated_from)
    log.info("resuming from %s checkpoint step %d at %s", tier, manifest.step, path)
    return ResumePoint(
        step=manifest.step,
        path=path,
        data_position=None if mine is None else mine.data_position,
        extras=manifest.extras,
        local={} if mine is None else mine.local,
        manifest=manifest,
        tier=tier,
    )
