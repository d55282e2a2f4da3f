"""The wire format between the training client and the daemon, shared by both sides.

A connection-oriented AF_UNIX stream (datagrams overflow: `net.unix.max_dgram_qlen` is 10 here)
carries frames of a 4-byte big-endian length followed by one UTF-8 JSON object with a `type`
field. The first record on a connection is `hello`; it binds the connection to one (job, rank).

Records (keys not listed are ignored, so a newer client can talk to an older daemon):

- `hello`: v, job, rank, local_rank, world_size, pid, restart_count, stack_file? (faulthandler dump file),
  capabilities? (what the job can do when asked: `rollback`, in place, to a snapshot; unknown names ignored)
- `step`: step, step_seconds?, loss?, grad_norm?, lr?, samples?, tokens?, dropped?
- `phase`: phase (init | data | eval | checkpoint), event (begin | end), seconds?
- `checkpoint`: step, path, seconds?, local_skipped? (the rank's cumulative count of node-local saves
  skipped because its previous write was still in flight)
- `collective`: op, event (begin | end), seq, bytes?, seconds?
- `clip`: z_threshold (the clipping threshold the job runs with now: its acknowledgement of a clip action)
- `bye`: dropped?
- `startup`: stage (imported | rendezvous | checkpoint_loaded), at (the client's wall clock when it
  reached that stage; sent once connected, so a stage before the hello still carries its own time)

The wire stays strict JSON: a non-finite loss or grad-norm travels as the string "NaN",
"Infinity" or "-Infinity". `dropped` is the client's cumulative count of records it dropped.
Every field is validated; a bad record raises `RecordError` whose `reason` is one of a small
fixed set, so the daemon can count rejections with a bounded label.
"""
# Over 450 lines (issue 15): the whole wire contract (records, framing, parsing) in one file, so client
# and daemon read one definition of every record (next split: parsing).

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError

PROTOCOL_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024
"""Largest JSON payload accepted; a larger frame is rejected as oversized and the connection closed."""

HEADER = struct.Struct(">I")

DEFAULT_RUNTIME_DIR = Path("/run/trainwarden")
SOCKET_ENV = "TRAINWARDEN_SOCKET"
CONTROL_DIR_ENV = "TRAINWARDEN_CONTROL_DIR"
SOCKET_NAME = "client.sock"
CONTROL_SUBDIR = "control"

PHASES = ("init", "data", "eval", "checkpoint")
"""Phases a client may enter; `step` is the implicit phase between them."""

STARTUP_STAGES = ("imported", "rendezvous", "checkpoint_loaded")
"""Start-up stages a restarted rank reports, in order, so a restart is measured stage by stage."""
MAX_WALL_CLOCK = 1e11
"""Upper bound of a wall-clock timestamp (the year 5138): a larger `at` is a bug, not a time."""

COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "all_to_all")

JOB_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
"""Same rule as control file names, so every job can have a control file."""
JOB_ENV = "TRAINWARDEN_JOB"
"""The job's name as `trainwarden run` hands it to the job (the client's first choice after an argument)."""
DEFAULT_JOB = "job"
_UNSAFE_JOB_CHARS = re.compile(r"[^A-Za-z0-9_.-]")

EXIT_CHECKPOINTED = 75
"""Exit status after a planned stop: a checkpoint of the last step exists; resume the job."""

# Bounds that keep hostile values out of the store (ranks index state; huge values are bugs).
MAX_RANK = 1 << 20
MAX_STEP = (1 << 53) - 1
"""Steps, counts and sequence numbers become float samples: beyond 2**53 they would not stay exact
(2**63 - 1 rendered as 9223372036854775808 in a finding), so they are refused."""
MAX_SECONDS = 1e7
MAX_COUNT = 1e15
MAX_PATH_CHARS = 4096
CAPABILITIES = ("rollback",)
"""Capabilities a hello may advertise; the daemon prefers an in-place rollback to a restart."""
MAX_CAPABILITIES = 16


class Reason:
    """The bounded set of rejection reasons (the `reason` label of the rejected counter)."""

    OVERSIZED = "oversized"
    BAD_UTF8 = "bad_utf8"
    MALFORMED = "malformed"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"
    NO_HELLO = "no_hello"
    DUPLICATE_HELLO = "duplicate_hello"
    UID_DENIED = "uid_denied"
    RANK_LIMIT = "rank_limit"
    CONNECTION_LIMIT = "connection_limit"
    IDLE_TIMEOUT = "idle_timeout"
    """A connection closed for sending no hello in time, or nothing at all for too long."""
    EVICTED = "evicted"
    """A connection or rank entry dropped to make room for a new one (least recently active first)."""

    ALL = (
        OVERSIZED,
        BAD_UTF8,
        MALFORMED,
        UNKNOWN_TYPE,
        BAD_FIELD,
        NO_HELLO,
        DUPLICATE_HELLO,
        UID_DENIED,
        RANK_LIMIT,
        CONNECTION_LIMIT,
        IDLE_TIMEOUT,
        EVICTED,
    )


class RecordError(TrainwardenError):
    """A record the daemon refuses; `reason` is one of `Reason.ALL`, the message says what and where."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# --- locations --------------------------------------------------------------------------------


def default_socket_path(runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> Path:
    """Where the daemon listens when not configured otherwise."""
    return runtime_dir / SOCKET_NAME


def default_control_dir(runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> Path:
    """Where the daemon writes per-job control files.

    Under the runtime dir, next to the socket: control is node-local coordination with live
    processes, and a reboot should not replay a stale stop or checkpoint request.
    """
    return runtime_dir / CONTROL_SUBDIR


def safe_job_name(name: str) -> str:
    """`name` with characters outside [A-Za-z0-9_.-] replaced by '_' and cut to 128 characters."""
    cleaned = _UNSAFE_JOB_CHARS.sub("_", name)[:128]
    return cleaned if JOB_PATTERN.match(cleaned) else DEFAULT_JOB


def socket_path_from_env(env: Mapping[str, str] | None = None) -> Path:
    """The client's socket path: `$TRAINWARDEN_SOCKET` or the default."""
    env = os.environ if env is None else env
    value = env.get(SOCKET_ENV, "")
    return Path(value) if value else default_socket_path()


def control_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    """The client's control directory: `$TRAINWARDEN_CONTROL_DIR` or the default."""
    env = os.environ if env is None else env
    value = env.get(CONTROL_DIR_ENV, "")
    return Path(value) if value else default_control_dir()


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Binds a connection to one rank of one job."""

    job: str
    rank: int
    local_rank: int
    world_size: int
    pid: int
    restart_count: int
    version: int
    stack_file: str = ""
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One completed training step; values the client did not give are None."""

    step: int
    step_seconds: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    samples: float | None = None
    tokens: float | None = None
    dropped: int | None = None


@dataclass(frozen=True, slots=True)
class PhaseRecord:
    """Entering or leaving a non-step phase; `seconds` is the client-measured duration on end."""

    phase: str
    event: str
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint was saved (the path is kept for status, never used as a label)."""

    step: int
    path: str
    seconds: float | None = None
    local_skipped: int | None = None  # cumulative, this process's: local saves skipped while busy


@dataclass(frozen=True, slots=True)
class CollectiveRecord:
    """Begin or end of one torch.distributed collective; `seq` pairs them."""

    op: str
    event: str
    seq: int
    nbytes: int | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ClipRecord:
    """The clipping settings the job runs with, so the daemon knows a clip action took effect."""

    z_threshold: float


@dataclass(frozen=True, slots=True)
class ByeRecord:
    """The client closes cleanly."""

    dropped: int | None = None


@dataclass(frozen=True, slots=True)
class StartupRecord:
    """A rank reached a start-up stage at `at` (wall clock, seconds since the epoch)."""

    stage: str
    at: float


Record = (
    Hello
    | StepRecord
    | PhaseRecord
    | CheckpointRecord
    | CollectiveRecord
    | ClipRecord
    | ByeRecord
    | StartupRecord
)


# --- encoding (client side) -------------------------------------------------------------------

_NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def wire_float(value: float) -> float | str:
    """A float as it travels: non-finite values become strings so the JSON stays strict."""
    if value != value:  # noqa: PLR0124 - the cheapest NaN test
        return "NaN"
    return _NONFINITE.get(value, value)


def encode(record: Mapping[str, Any]) -> bytes:
    """One frame: length header + compact JSON. Raises ValueError for an oversized record."""
    payload = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    return HEADER.pack(len(payload)) + payload


# --- framing (daemon side) --------------------------------------------------------------------


class FrameDecoder:
    """Splits a byte stream into payloads; an oversized header is fatal for the connection."""

    def __init__(self, max_size: int = MAX_RECORD_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_size
        self.error: RecordError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes read from the socket; return every complete payload.

        A frame announcing more than the maximum sets `error` (reason `oversized`): the payloads
        before it are still returned, but the stream cannot be resynchronised after it, so the
        caller closes the connection and later feeds return nothing.
        """
        if self.error is not None:
            return []
        self._buf += data
        out: list[bytes] = []
        start = 0
        size = len(self._buf)
        while size - start >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf, start)
            if length > self._max:
                self._buf.clear()
                self.error = RecordError(Reason.OVERSIZED, f"frame of {length} bytes exceeds {self._max}")
                return out
            end = start + HEADER.size + length
            if end > size:
                break
            out.append(bytes(self._buf[start + HEADER.size : end]))
            start = end
        if start:
            del self._buf[:start]
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete frame."""
        return len(self._buf)


# --- parsing and validation -------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not JSON; send it as a string")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
"""Built once: `json.loads` with keyword arguments builds a new decoder on every call."""


def parse(payload: bytes) -> Record:
    """Decode and validate one payload; raise `RecordError` with a bounded reason."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(Reason.BAD_UTF8, f"payload is not UTF-8 at byte {exc.start}") from exc
    try:
        data = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise RecordError(Reason.MALFORMED, f"not JSON: {str(exc)[:200]}") from exc
    if not isinstance(data, dict):
        raise RecordError(Reason.MALFORMED, f"expected a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        shown = repr(kind)[:64]
        raise RecordError(Reason.UNKNOWN_TYPE, f"type {shown} is not one of {sorted(_PARSERS)}")
    return parser(data)


def _bad(kind: str, key: str, why: str) -> RecordError:
    return RecordError(Reason.BAD_FIELD, f"{kind}.{key}: {why}")


def _int(data: dict[str, Any], kind: str, key: str, lo: int, hi: int) -> int:
    value = data.get(key)
    if type(value) is not int:
        raise _bad(kind, key, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(kind, key, f"{value} outside [{lo}, {hi}]")
    return value


def _opt_int(data: dict[str, Any], kind: str, key: str, lo: int, hi: int) -> int | None:
    return None if data.get(key) is None else _int(data, kind, key, lo, hi)


_NONFINITE_TEXT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _opt_float(
    data: dict[str, Any],
    kind: str,
    key: str,
    lo: float,
    hi: float,
    *,
    nonfinite: bool = False,
) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if nonfinite and isinstance(value, str) and value in _NONFINITE_TEXT:
        number = _NONFINITE_TEXT[value]
        if number == -math.inf and lo >= 0:  # NaN and +Infinity are faults to report; -Infinity a bug
            raise _bad(kind, key, f"-Infinity outside [{lo}, {hi}]")
        return number
    if type(value) not in (int, float):
        raise _bad(kind, key, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        if nonfinite:
            return number
        raise _bad(kind, key, f"must be finite, got {number}")
    if not lo <= number <= hi:
        raise _bad(kind, key, f"{number} outside [{lo}, {hi}]")
    return number


def _choice(data: dict[str, Any], kind: str, key: str, choices: tuple[str, ...]) -> str:
    value = data.get(key)
    if not isinstance(value, str) or value not in choices:
        raise _bad(kind, key, f"{repr(value)[:64]} is not one of {list(choices)}")
    return value


def _hello(data: dict[str, Any]) -> Hello:
    job = data.get("job")
    if not isinstance(job, str) or not JOB_PATTERN.match(job):
        raise _bad("hello", "job", f"{repr(job)[:64]} must match {JOB_PATTERN.pattern}")
    version = _int(data, "hello", "v", 1, 1 << 16)
    world_size = _int(data, "hello", "world_size", 1, MAX_RANK)
    rank = _int(data, "hello", "rank", 0, MAX_RANK - 1)
    if rank >= world_size:
        raise _bad("hello", "rank", f"{rank} not below world_size {world_size}")
    return Hello(
        job=job,
        rank=rank,
        local_rank=_int(data, "hello", "local_rank", 0, MAX_RANK - 1),
        world_size=world_size,
        pid=_int(data, "hello", "pid", 1, (1 << 31) - 1),
        restart_count=_int(data, "hello", "restart_count", 0, 1 << 31),
        version=version,
        stack_file=_opt_path(data, "hello", "stack_file"),
        capabilities=_capabilities(data),
    )


def _capabilities(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("capabilities", [])
    if (
        not isinstance(value, list)
        or len(value) > MAX_CAPABILITIES
        or not all(isinstance(v, str) and 0 < len(v) <= 64 for v in value)
    ):
        raise _bad("hello", "capabilities", f"expected a list of at most {MAX_CAPABILITIES} short names")
    return tuple(sorted({v for v in value if v in CAPABILITIES}))  # a newer client's names are ignored


def _opt_path(data: dict[str, Any], kind: str, key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH_CHARS or "\x00" in value:
        raise _bad(kind, key, f"expected a path of 1-{MAX_PATH_CHARS} characters")
    return value


def _step(data: dict[str, Any]) -> StepRecord:
    k = "step"
    return StepRecord(
        step=_int(data, k, "step", 0, MAX_STEP),
        step_seconds=_opt_float(data, k, "step_seconds", 0.0, MAX_SECONDS),
        loss=_opt_float(data, k, "loss", -1e300, 1e300, nonfinite=True),
        grad_norm=_opt_float(data, k, "grad_norm", 0.0, 1e300, nonfinite=True),
        lr=_opt_float(data, k, "lr", 0.0, 1e6),
        samples=_opt_float(data, k, "samples", 0.0, MAX_COUNT),
        tokens=_opt_float(data, k, "tokens", 0.0, MAX_COUNT),
        dropped=_opt_int(data, k, "dropped", 0, MAX_STEP),
    )


def _phase(data: dict[str, Any]) -> PhaseRecord:
    return PhaseRecord(
        phase=_choice(data, "phase", "phase", PHASES),
        event=_choice(data, "phase", "event", ("begin", "end")),
        seconds=_opt_float(data, "phase", "seconds", 0.0, MAX_SECONDS),
    )


def _checkpoint(data: dict[str, Any]) -> CheckpointRecord:
    path = data.get("path")
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS or "\x00" in path:
        raise _bad("checkpoint", "path", f"expected a path of 1-{MAX_PATH_CHARS} characters")
    return CheckpointRecord(
        step=_int(data, "checkpoint", "step", 0, MAX_STEP),
        path=path,
        seconds=_opt_float(data, "checkpoint", "seconds", 0.0, MAX_SECONDS),
        local_skipped=_opt_int(data, "checkpoint", "local_skipped", 0, MAX_STEP),
    )


def _collective(data: dict[str, Any]) -> CollectiveRecord:
    k = "collective"
    return CollectiveRecord(
        op=_choice(data, k, "op", COLLECTIVE_OPS),
        event=_choice(data, k, "event", ("begin", "end")),
        seq=_int(data, k, "seq", 0, MAX_STEP),
        nbytes=_opt_int(data, k, "bytes", 0, 1 << 62),
        seconds=_opt_float(data, k, "seconds", 0.0, MAX_SECONDS),
    )


def _clip(data: dict[str, Any]) -> ClipRecord:
    z_threshold = _opt_float(data, "clip", "z_threshold", 0.0, 1e6)
    if z_threshold is None or z_threshold <= 0:
        raise _bad("clip", "z_threshold", "expected a number in (0, 1e6]")
    return ClipRecord(z_threshold=z_threshold)


def _startup(data: dict[str, Any]) -> StartupRecord:
    at = _opt_float(data, "startup", "at", 0.0, MAX_WALL_CLOCK)
    if at is None:
        raise _bad("startup", "at", f"expected a wall-clock time in [0, {MAX_WALL_CLOCK:g}]")
    return StartupRecord(stage=_choice(data, "startup", "stage", STARTUP_STAGES), at=at)


def _bye(data: dict[str, Any]) -> ByeRecord:
    return ByeRecord(dropped=_opt_int(data, "bye", "dropped", 0, MAX_STEP))


_PARSERS: dict[str, Callable[[dict[str, Any]], Record]] = {
    "hello": _hello,
    "step": _step,
    "phase": _phase,
    "checkpoint": _checkpoint,
    "collective": _collective,
    "clip": _clip,
    "bye": _bye,
    "startup": _startup,
}
