"""The per-job control file: how the daemon tells a training job what to do.

The daemon writes it atomically (temp file, fsync, rename); the client polls it with a cheap
`stat` and re-reads only when it changed. A restarted job reads the same file, so settings such
as tightened clipping persist across restarts. The format is versioned JSON.

The reader runs inside the training process, so nothing in the file may raise anything but
`ControlFileError`, block or grow memory: only a regular file of at most `MAX_CONTROL_BYTES` is
read (opened without following a final symlink and without blocking, so a FIFO or a link to
``/dev/zero`` is refused), and every field must have exactly the type the writer writes — a
``false`` stop request or a ``["12"]`` skip range is an error, not an action.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError
from trainwarden.safe_files import read_regular_file

CONTROL_FORMAT_VERSION = 1
MAX_CONTROL_BYTES = 256 * 1024
"""Largest control file read; the daemon's own files are a few hundred bytes."""
MAX_SKIP_RANGES = 4096
MAX_STEP = (1 << 53) - 1
"""Largest batch index in a skip range (exact as a float, like the steps the daemon stores)."""
MAX_REQUEST_CHARS = 256
_MAX_INT_DIGITS = 24  # JSON integers longer than this are refused before int() sees them
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


_CLIP_FLOATS = ("z_threshold", "ema_alpha", "warmup_max_norm", "skip_z_threshold")
_CLIP_INTS = ("warmup_steps", "max_consecutive_skips")
MAX_Z_THRESHOLD = 1e6
MAX_CLIP_NORM = 1e30
"""Largest finite `warmup_max_norm`: it becomes a float32 tensor, whose maximum is about 3.4e38."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def clip_settings_problems(settings: ClipSettings) -> list[str]:
    """Every bad field of `settings`, as ``name=value must …`` (empty when usable).

    Values may come from a JSON file, so any field may hold any type or a huge integer; this
    never raises.
    """
    values, bad = _clip_numbers(settings)
    if bad:
        return bad
    z, alpha = values["z_threshold"], values["ema_alpha"]
    norm, skip_z = values["warmup_max_norm"], values["skip_z_threshold"]
    if not 0 < z <= MAX_Z_THRESHOLD:  # NaN fails too
        bad.append(f"z_threshold={z!r} must be in (0, {MAX_Z_THRESHOLD:g}]")
    if not 0.0 < alpha < 1.0:
        bad.append(f"ema_alpha={alpha!r} must be in (0, 1)")
    if not (0 < norm <= MAX_CLIP_NORM or norm == math.inf):  # +inf: no clip in warm-up
        bad.append(f"warmup_max_norm={norm!r} must be in (0, {MAX_CLIP_NORM:g}] or inf")
    if not (z < skip_z <= MAX_Z_THRESHOLD or skip_z == math.inf):  # +inf: skipping off
        bad.append(
            f"skip_z_threshold={skip_z!r} must be > z_threshold={z!r} and <= {MAX_Z_THRESHOLD:g}, or inf"
        )
    if not 2 <= settings.warmup_steps <= 100_000:
        bad.append(f"warmup_steps={_short(settings.warmup_steps)} must be in [2, 100000]")
    if not 1 <= settings.max_consecutive_skips <= 1_000:
        bad.append(f"max_consecutive_skips={_short(settings.max_consecutive_skips)} must be in [1, 1000]")
    return bad


def _clip_numbers(settings: ClipSettings) -> tuple[dict[str, float], list[str]]:
    """The float fields as floats, and every field of the wrong type (or too large for a float)."""
    bad: list[str] = []
    values: dict[str, float] = {}
    for name in _CLIP_FLOATS:
        value = getattr(settings, name)
        if not _is_number(value):
            bad.append(f"{name}={_short(value)} must be a number")
            continue
        try:
            values[name] = float(value)
        except OverflowError:
            bad.append(f"{name}={_short(value)} is too large")
    bad.extend(
        f"{name}={_short(getattr(settings, name))} must be an int"
        for name in _CLIP_INTS
        if not _is_int(getattr(settings, name))
    )
    return values, bad


@dataclass(frozen=True)
class RollbackRequest:
    """Roll back in place to a snapshot older than `step` (the first bad step) and skip that batch.

    `id` changes with each request, so a job acts on one request once (`client.snapshot`).
    """

    id: str
    step: int


@dataclass(frozen=True)
class ControlState:
    """Everything the daemon asks of one job. Request ids change each time a new request is made."""

    job: str = ""
    clip: ClipSettings | None = None
    checkpoint_request: str | None = None
    stop_request: str | None = None
    skip_batches: tuple[tuple[int, int], ...] = ()
    # Added after format 1 shipped: absent from older files, which stay valid.
    rollback_request: RollbackRequest | None = None
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
        if self.rollback_request is None:
            del data["rollback_request"]  # files without a request read the same by older clients
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "<control>") -> ControlState:
        """Parse and validate; raise `ControlFileError` naming the file and the bad field."""
        try:
            data = _DECODER.decode(text)
        except (ValueError, RecursionError) as exc:
            raise ControlFileError(f"{where}: not JSON: {str(exc)[:200]}") from exc
        if not isinstance(data, dict):
            raise ControlFileError(f"{where}: expected an object, got {type(data).__name__}")
        version = data.get("version")
        if not _is_int(version) or version != CONTROL_FORMAT_VERSION:
            raise ControlFileError(f"{where}: unsupported control format version {_short(version)}")
        return cls(
            job=_job(data, where),
            clip=_clip(data.get("clip"), where),
            checkpoint_request=_request(data, "checkpoint_request", where),
            stop_request=_request(data, "stop_request", where),
            skip_batches=_skip_batches(data.get("skip_batches", []), where),
            rollback_request=_rollback_request(data.get("rollback_request"), where),
            updated_at=_updated_at(data.get("updated_at", 0.0), where),
            extra=_extra(data.get("extra", {}), where),
        )


def _short(value: object) -> str:
    """A bounded repr for messages (a 401-digit integer must not fill the log)."""
    if isinstance(value, int) and abs(value) >= 10**_MAX_INT_DIGITS:
        return f"<integer of about {value.bit_length() * 3 // 10} digits>"
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _bad(where: str, name: str, value: object, why: str) -> ControlFileError:
    return ControlFileError(f"{where}: field {name}={_short(value)}: {why}")


def _job(data: Mapping[str, Any], where: str) -> str:
    job = data.get("job", "")
    if not isinstance(job, str) or (job and not _JOB_NAME.match(job)):
        raise _bad(where, "job", job, f"must be a job name matching {_JOB_NAME.pattern}")
    return job


def _request(data: Mapping[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_CHARS:
        raise _bad(
            where, name, value, f"must be null or a request id string of 1-{MAX_REQUEST_CHARS} characters"
        )
    return value


def _clip(raw: object, where: str) -> ClipSettings | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(where, "clip", raw, "must be an object or null")
    known = {f.name for f in fields(ClipSettings)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise _bad(where, "clip", ", ".join(unknown)[:64], "unknown clip setting(s)")
    settings = ClipSettings(**raw)
    problems = clip_settings_problems(settings)
    if problems:
        raise ControlFileError(f"{where}: field clip: " + "; ".join(problems))
    return settings


def _skip_batches(raw: object, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, list):
        raise _bad(where, "skip_batches", raw, "must be a list of [first, last] pairs")
    if len(raw) > MAX_SKIP_RANGES:
        raise _bad(where, "skip_batches", f"<{len(raw)} ranges>", f"more than {MAX_SKIP_RANGES} ranges")
    ranges: list[tuple[int, int]] = []
    for i, pair in enumerate(raw):
        name = f"skip_batches[{i}]"
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_int(v) for v in pair):
            raise _bad(where, name, pair, "must be a pair of integers [first, last]")
        first, last = pair
        if not 0 <= first <= last <= MAX_STEP:
            raise _bad(where, name, pair, f"must satisfy 0 <= first <= last <= {MAX_STEP}")
        ranges.append((first, last))
    return tuple(ranges)


def _rollback_request(raw: object, where: str) -> RollbackRequest | None:
    if raw is None:
        return None
    name = "rollback_request"
    if not isinstance(raw, dict) or set(raw) != {"id", "step"}:
        raise _bad(where, name, raw, 'must be null or an object {"id": string, "step": integer}')
    request_id = raw["id"]
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_CHARS:
        why = f"must be a request id string of 1-{MAX_REQUEST_CHARS} characters"
        raise _bad(where, f"{name}.id", request_id, why)
    step = raw["step"]
    if not _is_int(step) or not 0 <= step <= MAX_STEP:
        raise _bad(where, f"{name}.step", step, f"must be an integer in [0, {MAX_STEP}]")
    return RollbackRequest(request_id, step)


def _updated_at(raw: object, where: str) -> float:
    if not _is_number(raw):
        raise _bad(where, "updated_at", raw, "must be a number")
    try:
        value = float(raw)  # type: ignore[arg-type]
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise _bad(where, "updated_at", raw, "must be a finite time >= 0")
    return value


def _extra(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad(where, "extra", raw, "must be an object")
    try:  # the daemon writes it back: it must stay JSON (no over-long integers)
        json.dumps(raw, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _bad(where, "extra", "{...}", f"must hold plain JSON values ({exc})") from exc
    return raw


class _HugeInt:
    """Stands in for a JSON integer too long to convert, so the message can name its field."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | _HugeInt:
    if len(text) > _MAX_INT_DIGITS:
        return _HugeInt(len(text))
    return int(text)


def _parse_constant(name: str) -> float:
    # The writer emits Infinity for "off" settings (json.dumps' default); NaN is never meaningful.
    if name == "Infinity":
        return math.inf
    if name == "-Infinity":
        return -math.inf
    raise ValueError(f"{name} is not a usable value")


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_constant=_parse_constant)


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
    """Read one control file; any problem is a `ControlFileError` naming the file (and field)."""
    try:
        raw = read_regular_file(path, MAX_CONTROL_BYTES)
    except OSError as exc:
        raise ControlFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlFileError(f"{path}: not UTF-8 at byte {exc.start}") from exc
    return ControlState.from_json(text, str(path))
