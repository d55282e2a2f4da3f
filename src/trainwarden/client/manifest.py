"""The checkpoint manifest: what a checkpoint holds and how to tell it is whole.

Each checkpoint directory has one ``manifest.json``, written last (by rank 0, after every rank's
shard is on disk), so its presence after the atomic rename means the checkpoint is complete. It
records the format version, the step, the size and sha256 of every file, each rank's RNG states,
data-loader position and local extras, and user extras. The manifest carries a checksum of its
own canonical JSON, so a flipped byte in it is caught too.

Versions: ``FORMAT_VERSION`` is written. Version 1 (the single-process prototype layout: one RNG
state and data position at top level, ``files`` as name → sha256) is migrated on load; a version
newer than this library is refused with a message saying to upgrade trainwarden.

Reading refuses anything but a regular file of at most `MAX_MANIFEST_BYTES` (a FIFO, a symlink
to ``/dev/zero`` or a directory is a refusal, never a hang or a huge read), JSON depth and number
bombs, and every field of another type or range than the writer writes. `verify_files` accounts
for every file of the directory: one the manifest does not list, a symlink or a FIFO is a refusal,
so a shard the manifest forgot cannot load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError
from trainwarden.safe_files import open_regular_file, read_regular_file

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "trainwarden-checkpoint"
FORMAT_VERSION = 2
_CHUNK = 1 << 20
_SHA256_HEX = 64
_HEX = frozenset("0123456789abcdef")
MAX_MANIFEST_BYTES = 256 << 20
"""Largest manifest read: about 20 KB of RNG state per rank, so room for some 12,000 ranks."""
MAX_STEP = 10**10 - 1
"""Checkpoint directories are named ``step_`` + 10 digits; a larger step could never be found."""
MAX_WORLD_SIZE = 1 << 20
MAX_FILE_BYTES = 1 << 50
_MAX_INT_DIGITS = 40


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
    fd, _st = open_regular_file(path)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """Read and validate the manifest of the checkpoint in `directory` (migrating old formats)."""
    path = directory / MANIFEST_NAME
    try:
        raw = read_regular_file(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError as exc:
        raise CheckpointError(path, "missing_manifest", "no manifest: the checkpoint is incomplete") from exc
    except OSError as exc:
        raise CheckpointError(path, "unreadable", f"cannot read manifest: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, "unreadable", f"manifest is not UTF-8 at byte {exc.start}") from exc
    return parse_manifest(text, path)


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


_DECODER = json.JSONDecoder(parse_int=_parse_int)
"""Integers are bounded before int() sees them; NaN/Infinity parse (an old metric may hold one)."""


def parse_manifest(text: str, where: Path) -> Manifest:
    """Parse manifest text; raise `CheckpointError` naming `where` and the problem."""
    if not text.strip():
        raise CheckpointError(where, "truncated", "manifest is empty (truncated write?)")
    try:
        body = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(where, "not_json", f"manifest is not valid JSON ({str(exc)[:200]})") from exc
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
    try:
        checksum_ok = body.get("checksum") == body_checksum(body)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(where, "malformed", f"manifest cannot be canonicalised: {exc!r}"[:300]) from exc
    if not checksum_ok:
        raise CheckpointError(where, "checksum", "manifest checksum mismatch (corrupted or edited)")
    try:
        if version == 1:
            return _from_v1(body)
        return _from_v2(body)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise CheckpointError(
            where, "malformed", f"manifest field missing or of the wrong type: {exc!r}"[:500]
        ) from exc


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what}={str(value)[:40]!r} must be an integer in [{lo}, {hi}]")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be an object, got {type(value).__name__}")
    return value


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what}={str(value)[:40]!r} must be a finite number")
    return float(value)


def _files(raw: Any, with_size: bool) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for name, entry in _dict(raw, "files").items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or name == MANIFEST_NAME or not rel.parts:
            raise ValueError(f"file name {name!r} escapes the checkpoint directory")
        if rel.as_posix() != name:
            raise ValueError(f"file name {name!r} is not in normal form")
        if with_size:
            fields = _dict(entry, f"files[{name!r}]")
            digest = fields["sha256"]
            size: int | None = _int(fields["size"], f"{name}: size", 0, MAX_FILE_BYTES)
        else:
            digest, size = entry, None
        if not isinstance(digest, str) or len(digest) != _SHA256_HEX or not set(digest) <= _HEX:
            raise ValueError(f"{name}: sha256 {str(digest)[:80]!r}")
        files[name] = FileEntry(digest, size)
    return files


def _metric(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"metric must be a number or null, got {type(value).__name__}")
    metric = float(value)
    return metric if math.isfinite(metric) else None


def _ranks(raw: Any, world_size: int) -> tuple[RankState, ...]:
    if not isinstance(raw, list):
        raise TypeError(f"ranks must be a list, got {type(raw).__name__}")
    ranks: list[RankState] = []
    seen: set[int] = set()
    for i, r in enumerate(raw):
        entry = _dict(r, f"ranks[{i}]")
        rank = _int(entry["rank"], f"ranks[{i}].rank", 0, world_size - 1)
        if rank in seen:
            raise ValueError(f"ranks[{i}].rank={rank} appears twice")
        seen.add(rank)
        ranks.append(
            RankState(
                rank=rank,
                rng=_dict(entry.get("rng"), f"ranks[{i}].rng"),
                data_position=entry.get("data_position"),
                local=_dict(entry.get("local"), f"ranks[{i}].local"),
            )
        )
    return tuple(ranks)


def _from_v2(body: Mapping[str, Any]) -> Manifest:
    world_size = _int(body["world_size"], "world_size", 1, MAX_WORLD_SIZE)
    torch_version = body.get("torch_version", "")
    if not isinstance(torch_version, str):
        raise TypeError(f"torch_version must be a string, got {type(torch_version).__name__}")
    return Manifest(
        step=_int(body["step"], "step", 0, MAX_STEP),
        world_size=world_size,
        files=_files(body["files"], with_size=True),
        ranks=_ranks(body["ranks"], world_size),
        extras=_dict(body.get("extras"), "extras"),
        metric=_metric(body.get("metric")),
        created_at=_finite(body.get("created_at", 0.0), "created_at"),
        torch_version=torch_version[:200],
    )


def _from_v1(body: Mapping[str, Any]) -> Manifest:
    """Format 1: single process; one RNG state and data position at top level, no sizes."""
    return Manifest(
        step=_int(body["step"], "step", 0, MAX_STEP),
        world_size=1,
        files=_files(body["files"], with_size=False),
        ranks=(
            RankState(rank=0, rng=_dict(body.get("rng"), "rng"), data_position=body.get("data_position")),
        ),
        extras=_dict(body.get("extras"), "extras"),
        metric=None,
        created_at=_finite(body.get("created_at", 0.0), "created_at"),
        migrated_from=1,
    )


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check that the directory holds exactly the files the manifest lists, each with its size and sha256.

    A file the manifest does not list is refused (``unlisted_file``), as is anything that is not a
    plain file or directory (``not_regular``: a symlink, FIFO, socket or device), so nothing in a
    checkpoint loads without having been checked.
    """
    if not manifest.files:
        raise CheckpointError(directory, "malformed", "manifest lists no files")
    _account_for_every_file(directory, manifest)
    for name, entry in manifest.files.items():
        path = directory / name
        try:
            fd, st = open_regular_file(path)
        except FileNotFoundError as exc:
            raise CheckpointError(path, "missing_file", "listed in the manifest but missing") from exc
        except OSError as exc:
            raise CheckpointError(path, "unreadable", f"cannot open: {exc.strerror or exc}") from exc
        os.close(fd)
        size = st.st_size
        if entry.size is not None and size != entry.size:
            what = "truncated" if size < entry.size else "corrupt"
            raise CheckpointError(path, what, f"size {size} bytes, manifest says {entry.size}")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(path, "unreadable", f"cannot read: {exc.strerror or exc}") from exc
        if digest != entry.sha256:
            raise CheckpointError(path, "checksum", "sha256 mismatch (corrupted)")


def _account_for_every_file(directory: Path, manifest: Manifest) -> None:
    """Refuse any entry under `directory` that the manifest does not list or that is not plain."""
    stack = [directory]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                found = list(entries)
        except OSError as exc:
            raise CheckpointError(current, "unreadable", f"cannot list: {exc.strerror or exc}") from exc
        for entry in found:
            path = Path(entry.path)
            rel = path.relative_to(directory).as_posix()
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                raise CheckpointError(path, "unreadable", f"cannot stat: {exc.strerror or exc}") from exc
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif not stat.S_ISREG(mode):
                kind = "symbolic link" if stat.S_ISLNK(mode) else stat.filemode(mode)
                raise CheckpointError(path, "not_regular", f"a {kind} inside a checkpoint is never loaded")
            elif rel != MANIFEST_NAME and rel not in manifest.files:
                raise CheckpointError(
                    path, "unlisted_file", "not listed in the manifest: it could load unchecked"
                )
