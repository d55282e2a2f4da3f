"""The per-job control file: how the daemon tells a training job what to do.

The daemon writes it atomically (temp file, fsync, rename); the client polls it with a cheap
`stat` and re-reads only when it changed. A restarted job reads the same file, so settings such
as tightened clipping persist across restarts. The format is versioned JSON.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError

CONTROL_FORMAT_VERSION = 1
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class ControlFileError(TrainwardenError):
    """A control file that cannot be parsed; the client keeps its previous settings."""


@dataclass(frozen=True)
class ClipSettings:
    """Adaptive clipping parameters the daemon may change (see `trainwarden.client.clipping`)."""

    z_threshold: float = 2.5
    ema_alpha: float = 0.97
    warmup_steps: int = 25
    warmup_max_norm: float = 1.0
    # Added after format 1 shipped; the defaults keep older control files and checkpoints valid.
    skip_z_threshold: float = 10.0
    max_consecutive_skips: int = 3


@dataclass(frozen=True)
class ControlState:
    """Everything the daemon asks of one job. Request ids change each time a new request is made."""

    job: str = ""
    clip: ClipSettings | None = None
    checkpoint_request: str | None = None
    stop_request: str | None = None
    skip_batches: tuple[tuple[int, int], ...] = ()
    updated_at: float = 0.0
    version: int = CONTROL_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def should_skip(self, batch_index: int) -> bool:
        """True when `batch_index` lies in a skipped range (inclusive bounds)."""
        return any(start <= batch_index <= end for start, end in self.skip_batches)

    def to_json(self) -> str:
        """Serialise for writing."""
        data = asdict(self)
        data["skip_batches"] = [list(r) for r in self.skip_batches]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "<control>") -> ControlState:
        """Parse and validate; raise `ControlFileError` naming the file and the bad field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ControlFileError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ControlFileError(f"{where}: expected an object, got {type(data).__name__}")
        version = data.get("version")
        if version != CONTROL_FORMAT_VERSION:
            raise ControlFileError(f"{where}: unsupported control format version {version!r}")
        try:
            clip = data.get("clip")
            skip = tuple((int(a), int(b)) for a, b in data.get("skip_batches", []))
            return cls(
                job=str(data.get("job", "")),
                clip=ClipSettings(**clip) if clip is not None else None,
                checkpoint_request=_opt_str(data.get("checkpoint_request")),
                stop_request=_opt_str(data.get("stop_request")),
                skip_batches=skip,
                updated_at=float(data.get("updated_at", 0.0)),
                extra=dict(data.get("extra", {})),
            )
        except (TypeError, ValueError) as exc:
            raise ControlFileError(f"{where}: bad field: {exc}") from exc


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def control_path(directory: Path, job: str) -> Path:
    """Where the control file of `job` lives; rejects job names that could escape the directory."""
    if not _JOB_NAME.match(job):
        raise ControlFileError(f"job name {job!r} must match {_JOB_NAME.pattern}")
    return directory / f"{job}.control.json"


def write_control(path: Path, state: ControlState) -> None:
    """Atomically replace the control file (temp + fsync + rename + fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(state.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # noqa: PTH101 - on the temp path before the rename
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_control(path: Path) -> ControlState:
    """Read one control file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ControlFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return ControlState.from_json(text, str(path))
