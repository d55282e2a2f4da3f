"""The checkpoint manifest: what a checkpoint holds and how to tell it is whole.

Each checkpoint directory has one ``manifest.json``, written last (by rank 0, after every rank's
shard is on disk), so its presence after the atomic rename means the checkpoint is complete. It
records the format version, the step, the size and sha256 of every file, each rank's RNG states,
data-loader position and local extras, and user extras. The manifest carries a checksum of its
own canonical JSON, so a flipped byte in it is caught too.

Versions: ``FORMAT_VERSION`` is written. Version 1 (the single-process prototype layout: one RNG
state and data position at top level, ``files`` as name → sha256) is migrated on load; a version
newer than this library is refused with a message saying to upgrade trainwarden.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "trainwarden-checkpoint"
FORMAT_VERSION = 2
_CHUNK = 1 << 20
_SHA256_HEX = 64


class CheckpointError(TrainwardenError):
    """A checkpoint that cannot be used; names the file and what is wrong.

    `reason` is a short, bounded word (``missing_manifest``, ``checksum``, ``newer_version`` …)
    suitable as a metric label; `path` is the offending file or directory.
    """

    def __init__(self, path: Path | str, reason: str, detail: str) -> None:
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {detail} [{reason}]")

    def __reduce__(self) -> tuple[type[CheckpointError], tuple[str, str, str]]:
        # Picklable with its fields, so ranks can exchange it through object collectives.
        return (type(self), (str(self.path), self.reason, self.detail))


@dataclass(frozen=True, slots=True)
class FileEntry:
    """Size and digest of one file of a checkpoint, relative to the checkpoint directory."""

    sha256: str
    size: int | None  # None only for files migrated from format 1, which did not record sizes


@dataclass(frozen=True, slots=True)
class RankState:
    """What one rank needs back on resume beyond the (sharded) tensors."""

    rank: int
    rng: Mapping[str, Any] = field(default_factory=dict)
    data_position: Any = None
    local: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed, validated manifest (always in the current format, after migration)."""

    step: int
    world_size: int
    files: Mapping[str, FileEntry]
    ranks: tuple[RankState, ...]
    extras: Mapping[str, Any] = field(default_factory=dict)
    metric: float | None = None
    created_at: float = 0.0
    torch_version: str = ""
    migrated_from: int | None = None

    def to_json(self) -> str:
        """Serialise in the current format, with the self-checksum."""
        body: dict[str, Any] = {
            "kind": MANIFEST_KIND,
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "created_at": self.created_at,
            "torch_version": self.torch_version,
            "metric": self.metric,
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in sorted(self.files.items())},
            "ranks": [
                {"rank": r.rank, "rng": r.rng, "data_position": r.data_position, "local": r.local}
                for r in self.ranks
            ],
            "extras": self.extras,
        }
        body["checksum"] = body_checksum(body)
        return json.dumps(body, sort_keys=True, indent=1)

    def rank_state(self, rank: int) -> RankState | None:
        """The state saved by `rank`, or None if that rank did not exist then."""
        for state in self.ranks:
            if state.rank == rank:
                return state
        return None


def body_checksum(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its `checksum` field."""
    rest = {k: v for k, v in body.items() if k != "checksum"}
    canon = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """Read and validate the manifest of the checkpoint in `directory` (migrating old formats)."""
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CheckpointError(path, "missing_manifest", "no manifest: the checkpoint is incomplete") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, "unreadable", f"cannot read manifest: {exc}") from exc
    return parse_manifest(text, path)


def parse_manifest(text: str, where: Path) -> Manifest:
    """Parse manifest text; raise `CheckpointError` naming `where` and the problem."""
    if not text.strip():
        raise CheckpointError(where, "truncated", "manifest is empty (truncated write?)")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(where, "not_json", f"manifest is not valid JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("kind") != MANIFEST_KIND:
        raise CheckpointError(
            where, "foreign", f"not a trainwarden checkpoint manifest (kind != {MANIFEST_KIND!r})"
        )
    version = body.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(where, "bad_version", f"format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            where,
            "newer_version",
            f"checkpoint format version {version} is newer than this trainwarden supports "
            f"({FORMAT_VERSION}); upgrade trainwarden to load it",
        )
    if body.get("checksum") != body_checksum(body):
        raise CheckpointError(where, "checksum", "manifest checksum mismatch (corrupted or edited)")
    try:
        if version == 1:
            return _from_v1(body)
        return _from_v2(body)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            where, "malformed", f"manifest field missing or of the wrong type: {exc!r}"
        ) from exc


def _files(raw: Mapping[str, Any], with_size: bool) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for name, entry in raw.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or name == MANIFEST_NAME:
            raise ValueError(f"file name {name!r} escapes the checkpoint directory")
        if with_size:
            digest, size = str(entry["sha256"]), entry["size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"{name}: size {size!r}")
        else:
            digest, size = str(entry), None
        if len(digest) != _SHA256_HEX:
            raise ValueError(f"{name}: sha256 {digest!r}")
        files[str(name)] = FileEntry(digest, size)
    return files


def _metric(value: Any) -> float | None:
    if value is None:
        return None
    metric = float(value)
    return metric if math.isfinite(metric) else None


def _from_v2(body: Mapping[str, Any]) -> Manifest:
    ranks = tuple(
        RankState(
            rank=int(r["rank"]),
            rng=dict(r.get("rng") or {}),
            data_position=r.get("data_position"),
            local=dict(r.get("local") or {}),
        )
        for r in body["ranks"]
    )
    return Manifest(
        step=int(body["step"]),
        world_size=int(body["world_size"]),
        files=_files(body["files"], with_size=True),
        ranks=ranks,
        extras=dict(body.get("extras") or {}),
        metric=_metric(body.get("metric")),
        created_at=float(body.get("created_at", 0.0)),
        torch_version=str(body.get("torch_version", "")),
    )


def _from_v1(body: Mapping[str, Any]) -> Manifest:
    """Format 1: single process; one RNG state and data position at top level, no sizes."""
    return Manifest(
        step=int(body["step"]),
        world_size=1,
        files=_files(body["files"], with_size=False),
        ranks=(RankState(rank=0, rng=dict(body.get("rng") or {}), data_position=body.get("data_position")),),
        extras=dict(body.get("extras") or {}),
        metric=None,
        created_at=float(body.get("created_at", 0.0)),
        migrated_from=1,
    )


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check that every file the manifest lists exists with its size and sha256."""
    if not manifest.files:
        raise CheckpointError(directory, "malformed", "manifest lists no files")
    for name, entry in manifest.files.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise CheckpointError(path, "missing_file", "listed in the manifest but missing") from exc
        except OSError as exc:
            raise CheckpointError(path, "unreadable", f"cannot stat: {exc}") from exc
        if entry.size is not None and size != entry.size:
            what = "truncated" if size < entry.size else "corrupt"
            raise CheckpointError(path, what, f"size {size} bytes, manifest says {entry.size}")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(path, "unreadable", f"cannot read: {exc}") from exc
        if digest != entry.sha256:
            raise CheckpointError(path, "checksum", "sha256 mismatch (corrupted)")
