"""The daemon's side of the training client: a Unix-socket server turning records into metrics.

A server thread (selectors, non-blocking sockets) accepts connections from allowed uids only
(SO_PEERCRED), decodes frames (`trainwarden.protocol`), validates every record and updates
per-rank state; `collect()` renders that state under the training metric contract. Bad input
of any kind is rejected with a bounded reason and counted; nothing a client sends can stop the
server thread or the daemon. The collector also writes the per-job control files the healers
use to talk back (under `<runtime_dir>/control/` by default, see `protocol.default_control_dir`).

Windowed series get one point per record (timestamp = arrival time), not one per collection:
points that arrived since the last `collect()` are emitted in order before the latest value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trainwarden import control
from trainwarden.backends.base import RankProcess
from trainwarden.collectors import training_limits
from trainwarden.collectors.base import Collector, CollectorContext, RankIdentity
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorError
from trainwarden.model import MetricKind, MetricSpec, Sample
from trainwarden.protocol import (
    PHASES,
    ByeRecord,
    CheckpointRecord,
    ClipRecord,
    CollectiveRecord,
    FrameDecoder,
    Hello,
    PhaseRecord,
    Reason,
    Record,
    RecordError,
    StepRecord,
    default_control_dir,
    default_socket_path,
    parse,
)

log = logging.getLogger(__name__)

_RANK = ("job", "rank")
_G = MetricKind.GAUGE

TRAIN_STEP = MetricSpec("trainwarden_train_step", "Last reported training step.", _G, _RANK, window=True)
LAST_STEP_TS = MetricSpec(
    "trainwarden_train_last_step_timestamp_seconds",
    "When the daemon received the last step record.",
    _G,
    _RANK,
)
STEP_SECONDS = MetricSpec(
    "trainwarden_train_step_seconds",
    "Duration of each step as measured by the client (one windowed point per step).",
    _G,
    _RANK,
    window=True,
)
STEP_DURATION = MetricSpec(
    "trainwarden_train_step_duration_seconds", "Distribution of step durations.", MetricKind.HISTOGRAM, _RANK
)
LOSS = MetricSpec(
    "trainwarden_train_loss", "Last reported loss (NaN/Inf passed through).", _G, _RANK, window=True
)
GRAD_NORM = MetricSpec(
    "trainwarden_train_grad_norm", "Last reported pre-clip gradient norm.", _G, _RANK, window=True
)
LEARNING_RATE = MetricSpec("trainwarden_train_learning_rate", "Last reported learning rate.", _G, _RANK)
SAMPLES_PER_SECOND = MetricSpec(
    "trainwarden_train_samples_per_second", "Samples of the last step divided by its duration.", _G, _RANK
)
TOKENS_PER_SECOND = MetricSpec(
    "trainwarden_train_tokens_per_second", "Tokens of the last step divided by its duration.", _G, _RANK
)
PHASE = MetricSpec(
    "trainwarden_train_phase", "1 for the rank's current phase, 0 for the others.", _G, (*_RANK, "phase")
)
PHASE_STARTED = MetricSpec(
    "trainwarden_train_phase_started_timestamp_seconds", "When the rank's current phase began.", _G, _RANK
)
PHASE_SECONDS = MetricSpec(
    "trainwarden_train_phase_seconds",
    "Duration of each completed non-step phase (one windowed point per phase).",
    _G,
    (*_RANK, "phase"),
    window=True,
)
RESTART_COUNT = MetricSpec(
    "trainwarden_train_launcher_restarts", "Restarts of the job as the launcher counts them.", _G, _RANK
)
CLIP_Z_THRESHOLD = MetricSpec(
    "trainwarden_train_clip_z_threshold",
    "Clipping z-threshold the rank reports running with (its acknowledgement of a clip action).",
    _G,
    _RANK,
)
EXITED_CLEANLY = MetricSpec(
    "trainwarden_train_exited_cleanly",
    "1 once the rank's process said goodbye (a finished rank, not a crash); 0 while it runs.",
    _G,
    _RANK,
)
PID = MetricSpec("trainwarden_train_pid", "Process id of the rank (as the daemon sees it).", _G, _RANK)
PROCESS_UP = MetricSpec("trainwarden_train_process_up", "1 while the rank's process exists.", _G, _RANK)
COLLECTIVE_IN_FLIGHT = MetricSpec(
    "trainwarden_train_collective_in_flight_seconds",
    "Age of the oldest collective begun and not ended, 0 if none.",
    _G,
    _RANK,
)
COLLECTIVE_DURATION = MetricSpec(
    "trainwarden_train_collective_duration_seconds",
    "Distribution of collective durations as timed by the client.",
    MetricKind.HISTOGRAM,
    ("job", "op"),
)
LAST_CHECKPOINT_STEP = MetricSpec(
    "trainwarden_train_last_checkpoint_step", "Step of the last checkpoint the rank reported.", _G, _RANK
)
LAST_CHECKPOINT_TS = MetricSpec(
    "trainwarden_train_last_checkpoint_timestamp_seconds",
    "When the last checkpoint record arrived.",
    _G,
    _RANK,
)
RECEIVED = MetricSpec(
    "trainwarden_client_records_received_total",
    "Client records accepted (valid and applied).",
    MetricKind.COUNTER,
)
REJECTED = MetricSpec(
    "trainwarden_client_records_rejected_total",
    "Client records or connections refused, by reason.",
    MetricKind.COUNTER,
    ("reason",),
)
DROPPED = MetricSpec(
    "trainwarden_client_records_dropped_total",
    "Records the client itself dropped (daemon absent or slow), as it reported them.",
    MetricKind.COUNTER,
    _RANK,
)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)
COLLECTIVE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
ALL_PHASES = ("step", *PHASES)
_PENDING_POINTS = 4096  # per windowed series between two collections; older ones are dropped
_MAX_IN_FLIGHT = 1024  # collectives begun and not ended per rank; a leak must not grow forever
_READ_CHUNK = 256 * 1024
_READ_BUDGET = 1024 * 1024  # bytes per connection per turn, so one flood cannot starve the others
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class TrainingOptions(CollectorOptions):
    """Where the client socket lives and who may use it.

    Empty paths mean the defaults under the daemon's runtime dir; empty `allowed_uids` means the
    daemon's own uid and root.
    """

    socket_path: str = ""
    socket_mode: int = 0o660
    allowed_uids: tuple[int, ...] = ()
    control_dir: str = ""
    retention_seconds: float = 3600.0
    max_ranks: int = 256  # ranks on one node; about 42 series each, so this bounds the series budget
    max_connections: int = 1024
    # Idle and made-up clients must not starve real ranks (see `training_limits`).
    max_connections_per_uid: int = 512
    hello_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 900.0
    evict_idle_seconds: float = 60.0

    def problems(self) -> list[tuple[str, str]]:
        """Mode must be a permission mask, limits positive."""
        found = super().problems()
        if not 0 <= self.socket_mode <= 0o777:
            found.append(("socket_mode", "must be a permission mask 0o000-0o777"))
        if self.retention_seconds <= 0:
            found.append(("retention_seconds", "must be > 0"))
        if self.max_ranks < 1:
            found.append(("max_ranks", "must be >= 1"))
        if self.max_connections < 1:
            found.append(("max_connections", "must be >= 1"))
        if self.max_connections_per_uid < 1:
            found.append(("max_connections_per_uid", "must be >= 1"))
        for key in ("hello_timeout_seconds", "idle_timeout_seconds", "evict_idle_seconds"):
            if not 0 < getattr(self, key) < math.inf:
                found.append((key, "must be a finite number > 0"))
        found.extend(("allowed_uids", f"{uid} is not a uid") for uid in self.allowed_uids if uid < 0)
        return found


class _Histogram:
    """Cumulative-on-render bucket counts."""

    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.total += value

    def samples(self, spec: MetricSpec, **labels: str) -> Iterable[Sample]:
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            yield spec.sample(running, None, "_bucket", le=_le(bound), **labels)
        yield spec.sample(self.count, None, "_bucket", le="+Inf", **labels)
        yield spec.sample(self.total, None, "_sum", **labels)
        yield spec.sample(self.count, None, "_count", **labels)


def _le(bound: float) -> str:
    return repr(float(bound))


class _Series:
    """Latest (timestamp, value) plus the points not yet handed to the store."""

    __slots__ = ("latest", "pending")

    def __init__(self) -> None:
        self.latest: tuple[float, float] | None = None
        self.pending: deque[tuple[float, float]] = deque(maxlen=_PENDING_POINTS)

    def add(self, timestamp: float, value: float) -> None:
        self.latest = (timestamp, value)
        self.pending.append((timestamp, value))

    def samples(self, spec: MetricSpec, **labels: str) -> Iterable[Sample]:
        while self.pending:
            ts, value = self.pending.popleft()
            yield spec.sample(value, ts, "", **labels)
        if self.latest is not None:
            # Same (time, value) as the last point: the store does not append it twice.
            yield spec.sample(self.latest[1], self.latest[0], "", **labels)


@dataclass
class _RankState:
    """Everything the daemon knows about one rank."""

    job: str
    rank: int
    local_rank: int = 0
    world_size: int = 1
    pid: int = 0
    restart_count: int = 0
    last_seen: float = 0.0
    last_step_ts: float | None = None
    step: _Series = field(default_factory=_Series)
    step_seconds: _Series = field(default_factory=_Series)
    loss: _Series = field(default_factory=_Series)
    grad_norm: _Series = field(default_factory=_Series)
    phase_seconds: dict[str, _Series] = field(default_factory=dict)
    step_hist: _Histogram = field(default_factory=lambda: _Histogram(STEP_BUCKETS))
    lr: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    phase: str = "step"
    phase_started: float = 0.0
    in_flight: dict[int, float] = field(default_factory=dict)
    last_checkpoint_step: int | None = None
    last_checkpoint_ts: float | None = None
    last_checkpoint_path: str = ""
    clip_z_threshold: float | None = None
    dropped_base: int = 0  # drops reported by earlier processes of this rank
    dropped_reported: int = 0
    connected: bool = False
    stack_file: str = ""
    exited_cleanly: bool = False


@dataclass
class _Connection:
    sock: socket.socket
    pid: int
    uid: int
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    key: tuple[str, int] | None = None
    opened: float = 0.0  # time.monotonic(), like last_active
    last_active: float = 0.0


class TrainingCollector(Collector):
    """Receives client records over a Unix socket and exports the training metrics."""

    name: ClassVar[str] = "training"
    Options: ClassVar[type[CollectorOptions]] = TrainingOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        opts = options if isinstance(options, TrainingOptions) else TrainingOptions()
        self.opts = opts
        self.socket_path = (
            Path(opts.socket_path) if opts.socket_path else default_socket_path(context.runtime_dir)
        )
        self.control_dir = (
            Path(opts.control_dir) if opts.control_dir else default_control_dir(context.runtime_dir)
        )
        self.allowed_uids = frozenset(opts.allowed_uids or (os.getuid(), 0))
        self._lock = threading.Lock()
        self._ranks: dict[tuple[str, int], _RankState] = {}
        self._collective_hists: dict[tuple[str, str], _Histogram] = {}
        self._received = 0
        self._rejected = dict.fromkeys(Reason.ALL, 0)
        self._last_error: dict[str, str] = {}
        self._last_arrival = 0.0
        self._conns: dict[int, _Connection] = {}
        self._limits = training_limits.Limits(
            opts.max_connections,
            opts.max_connections_per_uid,
            opts.hello_timeout_seconds,
            opts.idle_timeout_seconds,
            opts.evict_idle_seconds,
        )
        self._next_sweep = 0.0
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (replacing a stale one, never a live one or a non-socket) and serve."""
        listener = self._bind()
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)  # noqa: FBT003 - stdlib signature
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name="trainwarden-training", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise CollectorError(f"{path}: exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)  # stale socket of a dead daemon
            else:
                raise CollectorError(f"{path}: another process is listening on this socket")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            # chmod before listen(): until then nobody can connect, so the mode is never too open.
            path.chmod(self.opts.socket_mode)
            listener.listen(512)
            listener.setblocking(False)  # noqa: FBT003 - stdlib signature
        except OSError as exc:
            listener.close()
            raise CollectorError(f"{path}: cannot listen: {exc.strerror or exc}") from exc
        return listener

    def close(self) -> None:
        """Stop the server thread, close every connection and remove the socket file."""
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        self._listener = None

    # --- server thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._selector is not None
        while not self._stopping.is_set():
            try:
                events = self._selector.select(timeout=1.0)
            except OSError:
                log.exception("training collector: select failed")
                self._stopping.wait(0.5)  # do not spin on a persistent error
                continue
            for key, _mask in events:
                try:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        return
                    else:
                        self._read(key.data)
                except Exception:  # a bug must not take the server down with it
                    log.exception("training collector: error while serving")
                    if isinstance(key.data, _Connection):
                        self._drop_connection(key.data)
            self._sweep()

    def _sweep(self) -> None:
        """Close connections without a hello in time or silent too long (at most twice a second)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.5
        for conn in training_limits.timed_out(list(self._conns.values()), now, self._limits):
            what = "sent no hello" if conn.key is None else "was silent"
            self._reject(Reason.IDLE_TIMEOUT, f"pid {conn.pid} {what} too long; connection closed")
            self._drop_connection(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        assert self._selector is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: refuse politely, keep serving
                log.warning("training collector: accept failed: %s", exc)
                return
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid not in self.allowed_uids:
                self._reject(Reason.UID_DENIED, f"connection from uid {uid} (pid {pid}) not in allowed_uids")
                sock.close()
                continue
            now = time.monotonic()
            admitted, victim = training_limits.admit(list(self._conns.values()), uid, now, self._limits)
            if not admitted:
                self._reject(
                    Reason.CONNECTION_LIMIT, f"already {len(self._conns)} connections; pid {pid} refused"
                )
                sock.close()
                continue
            if victim is not None:
                self._reject(Reason.EVICTED, f"connection of pid {victim.pid} closed to admit pid {pid}")
                self._drop_connection(victim)
            sock.setblocking(False)  # noqa: FBT003 - stdlib signature
            conn = _Connection(sock=sock, pid=pid, uid=uid, opened=now, last_active=now)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> None:
        budget = _READ_BUDGET
        while budget > 0:
            try:
                data = conn.sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_connection(conn)
                return
            if not data:
                self._drop_connection(conn)
                return
            conn.last_active = time.monotonic()
            budget -= len(data)
            for payload in conn.decoder.feed(data):
                try:
                    record = parse(payload)
                except RecordError as exc:
                    self._reject(exc.reason, f"pid {conn.pid}: {exc}")
                    continue
                if not self._apply(conn, record):
                    self._drop_connection(conn)
                    return
            error = conn.decoder.error
            if error is not None:
                self._reject(error.reason, f"pid {conn.pid}: {error}")
                self._drop_connection(conn)
                return

    def _drop_connection(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        self._conns.pop(fd, None)
        conn.sock.close()
        if conn.key is not None:
            with self._lock:
                state = self._ranks.get(conn.key)
                if state is not None and state.pid == conn.pid:
                    state.connected = False

    def _reject(self, reason: str, message: str) -> None:
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1
            first = reason not in self._last_error
            self._last_error[reason] = message[:300]
        if first:  # log each reason once; the counter carries the rate
            log.warning("training collector: rejected %s", message[:300])

    # --- records ------------------------------------------------------------------------------

    def _arrival(self) -> float:
        """Arrival time, strictly increasing so windowed points never collide."""
        now = max(self.context.clock(), self._last_arrival + 1e-6)
        self._last_arrival = now
        return now

    def _apply(self, conn: _Connection, record: Record) -> bool:
        """Apply one valid record; False means the connection must be closed."""
        if isinstance(record, Hello):
            return self._hello(conn, record)
        if conn.key is None:
            self._reject(Reason.NO_HELLO, f"pid {conn.pid}: {type(record).__name__} before hello")
            return True
        with self._lock:
            state = self._ranks.get(conn.key)
            if state is None:  # removed by retention while connected: needs a new hello
                conn.key = None
                self._rejected[Reason.NO_HELLO] += 1
                return True
            now = self._arrival()
            state.last_seen = now
            self._received += 1
            if isinstance(record, StepRecord):
                _on_step(state, record, now)
            elif isinstance(record, PhaseRecord):
                _on_phase(state, record, now)
            elif isinstance(record, CheckpointRecord | ClipRecord):
                _on_report(state, record, now)
            elif isinstance(record, CollectiveRecord):
                self._on_collective(state, record, now)
            elif isinstance(record, ByeRecord):
                state.exited_cleanly = True
                if record.dropped is not None:
                    state.dropped_reported = record.dropped
        return True

    def _hello(self, conn: _Connection, hello: Hello) -> bool:
        if conn.key is not None:
            self._reject(Reason.DUPLICATE_HELLO, f"pid {conn.pid}: second hello on one connection")
            return True
        key = (hello.job, hello.rank)
        # SO_PEERCRED's pid is in the daemon's pid namespace, the one /proc and NVML show.
        pid = conn.pid if conn.pid > 0 else hello.pid
        evicted: tuple[str, int] | None = None
        with self._lock:
            state = self._ranks.get(key)
            if state is None:
                if len(self._ranks) >= self.opts.max_ranks:
                    evicted = training_limits.rank_to_evict(self._ranks, self.context.clock(), self._limits)
                    if evicted is None:
                        self._rejected[Reason.RANK_LIMIT] += 1
                        message = f"{len(self._ranks)} ranks tracked, all active; {key} refused"
                        self._last_error[Reason.RANK_LIMIT] = message
                        return False
                    self._evict_rank(evicted, key)
                state = self._ranks[key] = _RankState(job=hello.job, rank=hello.rank)
            now = self._arrival()
            if state.pid and state.pid != pid:  # a new process for this rank (restart)
                self.context.pid_owners.forget(state.pid)
                state.dropped_base += state.dropped_reported
                state.dropped_reported = 0
                state.in_flight.clear()
            state.pid = pid
            state.local_rank = hello.local_rank
            state.world_size = hello.world_size
            state.restart_count = hello.restart_count
            state.stack_file = hello.stack_file
            state.exited_cleanly = False
            state.last_seen = now
            state.phase = "step"
            state.phase_started = now
            state.connected = True
            self._received += 1
        conn.key = key
        self.context.pid_owners.set(pid, RankIdentity(hello.job, hello.rank, hello.local_rank))
        if evicted is not None:  # its client must hello again, on a new connection
            for other in [c for c in self._conns.values() if c.key == evicted]:
                self._drop_connection(other)
        return True

    def _evict_rank(self, victim: tuple[str, int], newcomer: tuple[str, int]) -> None:
        """Drop `victim`'s entry (lock held) so that `newcomer` fits in the full rank table."""
        state = self._ranks.pop(victim)
        if state.pid:
            self.context.pid_owners.forget(state.pid)
        self._rejected[Reason.EVICTED] += 1
        self._last_error[Reason.EVICTED] = f"rank entry {victim} dropped to make room for {newcomer}"

    def _on_collective(self, state: _RankState, record: CollectiveRecord, now: float) -> None:
        if record.event == "begin":
            if len(state.in_flight) >= _MAX_IN_FLIGHT:
                state.in_flight.pop(next(iter(state.in_flight)))
            state.in_flight[record.seq] = now
            return
        began = state.in_flight.pop(record.seq, None)
        seconds = record.seconds
        if seconds is None and began is not None:
            seconds = now - began
        if seconds is None:
            return
        hist_key = (state.job, record.op)
        hist = self._collective_hists.get(hist_key)
        if hist is None:
            hist = self._collective_hists[hist_key] = _Histogram(COLLECTIVE_BUCKETS)
        hist.observe(seconds)

    # --- control files ------------------------------------------------------------------------

    def write_control(self, job: str, state: control.ControlState) -> Path:
        """Atomically write `job`'s control file (the job name is validated); return its path."""
        path = control.control_path(self.control_dir, job)
        if state.job != job:
            state = dataclasses.replace(state, job=job)
        control.write_control(path, state)
        return path

    def read_control(self, job: str) -> control.ControlState | None:
        """The job's current control state, or None when it has no control file."""
        path = control.control_path(self.control_dir, job)
        if not path.exists():
            return None
        return control.read_control(path)

    # --- the healers' view of the ranks (trainwarden.backends.base.JobView) --------------------

    def processes(self, job: str | None = None) -> list[RankProcess]:
        """Every known local rank of `job` (None: of every job) with its pid and faulthandler stack file."""
        with self._lock:
            return [
                RankProcess(
                    s.job,
                    s.rank,
                    s.local_rank,
                    s.pid,
                    s.stack_file,
                    connected=s.connected,
                    exited_cleanly=s.exited_cleanly,
                    checkpoint_at=s.last_checkpoint_ts,
                )
                for s in sorted(self._ranks.values(), key=lambda s: s.rank)
                if job is None or s.job == job
            ]

    def forget(self, job: str) -> None:
        """Drop `job`'s ranks after a restart: their old pids vanished on purpose, not by a crash."""
        with self._lock:
            for key in [k for k in self._ranks if k[0] == job]:
                state = self._ranks.pop(key)
                if state.pid:
                    self.context.pid_owners.forget(state.pid)

    # --- collection ---------------------------------------------------------------------------

    def collect(self) -> Iterable[Sample]:
        """Render every rank's state; forget jobs silent longer than the retention."""
        now = self.context.clock()
        with self._lock:
            self._expire(now)
            ranks = list(self._ranks.values())
            out: list[Sample] = []
            for state in ranks:
                out.extend(self._rank_samples(state, now))
            for (job, op), hist in self._collective_hists.items():
                out.extend(hist.samples(COLLECTIVE_DURATION, job=job, op=op))
            out.append(RECEIVED.sample(self._received))
            out.extend(REJECTED.sample(n, reason=reason) for reason, n in self._rejected.items())
        return out

    def _expire(self, now: float) -> None:
        last_seen: dict[str, float] = {}
        for (job, _rank), state in self._ranks.items():
            last_seen[job] = max(last_seen.get(job, 0.0), state.last_seen)
        dead = {job for job, seen in last_seen.items() if now - seen > self.opts.retention_seconds}
        if not dead:
            return
        for key in [k for k in self._ranks if k[0] in dead]:
            state = self._ranks.pop(key)
            if state.pid:
                self.context.pid_owners.forget(state.pid)
        for hist_key in [k for k in self._collective_hists if k[0] in dead]:
            del self._collective_hists[hist_key]
        log.info("training collector: forgot silent job(s) %s", ", ".join(sorted(dead)))

    def _rank_samples(self, state: _RankState, now: float) -> Iterable[Sample]:
        job, rank = state.job, str(state.rank)
        labels = {"job": job, "rank": rank}
        yield from state.step.samples(TRAIN_STEP, **labels)
        if state.last_step_ts is not None:
            yield LAST_STEP_TS.sample(state.last_step_ts, job=job, rank=rank)
        yield from state.step_seconds.samples(STEP_SECONDS, **labels)
        yield from state.step_hist.samples(STEP_DURATION, **labels)
        yield from state.loss.samples(LOSS, **labels)
        yield from state.grad_norm.samples(GRAD_NORM, **labels)
        for spec, value in (
            (LEARNING_RATE, state.lr),
            (SAMPLES_PER_SECOND, state.samples_per_second),
            (TOKENS_PER_SECOND, state.tokens_per_second),
            (LAST_CHECKPOINT_STEP, state.last_checkpoint_step),
            (LAST_CHECKPOINT_TS, state.last_checkpoint_ts),
            (CLIP_Z_THRESHOLD, state.clip_z_threshold),
        ):
            if value is not None:
                yield spec.sample(value, job=job, rank=rank)
        for phase in ALL_PHASES:
            yield PHASE.sample(1.0 if phase == state.phase else 0.0, job=job, rank=rank, phase=phase)
        yield PHASE_STARTED.sample(state.phase_started, job=job, rank=rank)
        for phase, series in state.phase_seconds.items():
            yield from series.samples(PHASE_SECONDS, job=job, rank=rank, phase=phase)
        yield RESTART_COUNT.sample(state.restart_count, job=job, rank=rank)
        yield PID.sample(state.pid, job=job, rank=rank)
        yield EXITED_CLEANLY.sample(1.0 if state.exited_cleanly else 0.0, job=job, rank=rank)
        alive = state.pid > 0 and self.context.paths.proc(str(state.pid)).exists()
        yield PROCESS_UP.sample(1.0 if alive else 0.0, job=job, rank=rank)
        oldest = min(state.in_flight.values(), default=None)
        age = 0.0 if oldest is None else max(0.0, now - oldest)
        yield COLLECTIVE_IN_FLIGHT.sample(age, job=job, rank=rank)
        yield DROPPED.sample(state.dropped_base + state.dropped_reported, job=job, rank=rank)

    def status(self) -> Mapping[str, Any]:
        """Socket, connection count, tracked ranks and the last message per rejection reason."""
        with self._lock:
            return {
                "socket": str(self.socket_path),
                "control_dir": str(self.control_dir),
                "connections": len(self._conns),
                "ranks": [
                    {
                        "job": s.job,
                        "rank": s.rank,
                        "pid": s.pid,
                        "connected": s.connected,
                        "phase": s.phase,
                        "step": None if s.step.latest is None else int(s.step.latest[1]),
                        "last_checkpoint": s.last_checkpoint_path,
                    }
                    for s in self._ranks.values()
                ],
                "received": self._received,
                "rejected": {k: v for k, v in self._rejected.items() if v},
                "last_rejection": dict(self._last_error),
            }


def _on_step(state: _RankState, record: StepRecord, now: float) -> None:
    state.last_step_ts = now
    state.step.add(now, float(record.step))
    if record.step_seconds is not None:
        state.step_seconds.add(now, record.step_seconds)
        state.step_hist.observe(record.step_seconds)
    if record.loss is not None:
        state.loss.add(now, record.loss)
    if record.grad_norm is not None:
        state.grad_norm.add(now, record.grad_norm)
    if record.lr is not None:
        state.lr = record.lr
    seconds = record.step_seconds
    if seconds is not None and seconds > 0:
        if record.samples is not None:
            state.samples_per_second = record.samples / seconds
        if record.tokens is not None:
            state.tokens_per_second = record.tokens / seconds
    if record.dropped is not None:
        state.dropped_reported = record.dropped


def _on_report(state: _RankState, record: CheckpointRecord | ClipRecord, now: float) -> None:
    """A checkpoint saved, or the clip settings the rank runs with."""
    if isinstance(record, ClipRecord):
        state.clip_z_threshold = record.z_threshold
        return
    state.last_checkpoint_step = record.step
    state.last_checkpoint_ts = now
    state.last_checkpoint_path = record.path


def _on_phase(state: _RankState, record: PhaseRecord, now: float) -> None:
    if record.event == "begin":
        state.phase = record.phase
        state.phase_started = now
        return
    seconds = record.seconds
    if seconds is None and state.phase == record.phase:
        seconds = now - state.phase_started
    if seconds is not None and math.isfinite(seconds):
        series = state.phase_seconds.get(record.phase)
        if series is None:
            series = state.phase_seconds[record.phase] = _Series()
        series.add(now, seconds)
    state.phase = "step"
    state.phase_started = now


COLLECTOR = TrainingCollector
