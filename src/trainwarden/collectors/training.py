"""The daemon's side of the training client: a Unix-socket server turning records into metrics.

A server thread (selectors, non-blocking sockets) accepts connections from allowed uids only
(SO_PEERCRED), decodes frames (`trainwarden.protocol`), validates every record and updates
per-rank state; `collect()` renders that state under the training metric contract. Bad input
of any kind is rejected with a bounded reason and counted; nothing a client sends can stop the
server thread or the daemon. The collector also writes the per-job control files the healers
use to talk back (under `<runtime_dir>/control/` by default, see `protocol.default_control_dir`).

Windowed series get one point per record (timestamp = arrival time), not one per collection:
points that arrived since the last `collect()` are emitted in order before the latest value.
Every applied record also goes, in arrival order, to the context's `record_listeners` (the
goodput accountant). The socket server is `training_server`, the per-rank state and its record
handlers `training_state`, the metric contract `training_metrics`.
"""

# Over 450 lines (issue 15): the collector's record dispatch (hello, steps, collectives, control files,
# rank table) in one class; the server, the state and the metrics are already their own modules.

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from trainwarden import control
from trainwarden.collectors import training_limits
from trainwarden.collectors.base import Collector, CollectorContext, RankIdentity
from trainwarden.collectors.training_metrics import (
    ALL_PHASES,
    CLIP_Z_THRESHOLD,
    COLLECTIVE_BUCKETS,
    COLLECTIVE_DURATION,
    COLLECTIVE_IN_FLIGHT,
    DROPPED,
    EXITED_CLEANLY,
    GRAD_NORM,
    LAST_CHECKPOINT_STEP,
    LAST_CHECKPOINT_TS,
    LAST_STEP_TS,
    LEARNING_RATE,
    LOCAL_SAVES_SKIPPED,
    LOSS,
    PHASE,
    PHASE_SECONDS,
    PHASE_STARTED,
    PID,
    PROCESS_UP,
    RECEIVED,
    REJECTED,
    RESTART_COUNT,
    ROLLBACK_CAPABLE,
    SAMPLES_PER_SECOND,
    STEP_BUCKETS,
    STEP_DURATION,
    STEP_SECONDS,
    TOKENS_PER_SECOND,
    TRAIN_STEP,
)
from trainwarden.collectors.training_server import Connection, TrainingSocketServer
from trainwarden.collectors.training_state import (
    MAX_IN_FLIGHT,
    Histogram,
    RankState,
    on_phase,
    on_report,
    on_step,
)
from trainwarden.config import CollectorOptions
from trainwarden.model import RankProcess, Sample
from trainwarden.protocol import (
    ByeRecord,
    CheckpointRecord,
    ClipRecord,
    CollectiveRecord,
    Hello,
    PhaseRecord,
    Reason,
    Record,
    StepRecord,
    default_control_dir,
    default_socket_path,
)

__all__ = [
    "ALL_PHASES",
    "CLIP_Z_THRESHOLD",
    "COLLECTIVE_BUCKETS",
    "COLLECTIVE_DURATION",
    "COLLECTIVE_IN_FLIGHT",
    "COLLECTOR",
    "DROPPED",
    "EXITED_CLEANLY",
    "GRAD_NORM",
    "LAST_CHECKPOINT_STEP",
    "LAST_CHECKPOINT_TS",
    "LAST_STEP_TS",
    "LEARNING_RATE",
    "LOSS",
    "PHASE",
    "PHASE_SECONDS",
    "PHASE_STARTED",
    "PID",
    "PROCESS_UP",
    "RECEIVED",
    "REJECTED",
    "RESTART_COUNT",
    "SAMPLES_PER_SECOND",
    "STEP_BUCKETS",
    "STEP_DURATION",
    "STEP_SECONDS",
    "TOKENS_PER_SECOND",
    "TRAIN_STEP",
    "TrainingCollector",
    "TrainingOptions",
]

log = logging.getLogger(__name__)


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


class TrainingCollector(TrainingSocketServer, Collector):
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
        self._ranks: dict[tuple[str, int], RankState] = {}
        self._collective_hists: dict[tuple[str, str], Histogram] = {}
        self._received = 0
        self._rejected = dict.fromkeys(Reason.ALL, 0)
        self._last_error: dict[str, str] = {}
        self._last_arrival = 0.0
        limits = training_limits.Limits(
            opts.max_connections,
            opts.max_connections_per_uid,
            opts.hello_timeout_seconds,
            opts.idle_timeout_seconds,
            opts.evict_idle_seconds,
        )
        self._init_server(opts.socket_mode, limits)

    def _connection_closed(self, conn: Connection) -> None:
        with self._lock:
            state = self._ranks.get(conn.key) if conn.key is not None else None
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

    def _apply(self, conn: Connection, record: Record) -> bool:
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
                on_step(state, record, now)
            elif isinstance(record, PhaseRecord):
                on_phase(state, record, now)
            elif isinstance(record, CheckpointRecord | ClipRecord):
                on_report(state, record, now)
            elif isinstance(record, CollectiveRecord):
                self._on_collective(state, record, now)
            elif isinstance(record, ByeRecord):
                state.exited_cleanly = True
                if record.dropped is not None:
                    state.dropped_reported = record.dropped
            self._tell(now, state, conn.pid if conn.pid > 0 else state.pid, record)
        return True

    def _tell(self, now: float, state: RankState, pid: int, record: Record) -> None:
        """Hand an applied record to the context's listeners (lock held, so they see arrival order)."""
        for listener in self.context.record_listeners:
            try:
                listener(now, state.job, state.rank, pid, record)
            except Exception:  # a listener's bug must not cost this rank its connection
                log.exception("training collector: a record listener failed")

    def _hello(self, conn: Connection, hello: Hello) -> bool:
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
                state = self._ranks[key] = RankState(job=hello.job, rank=hello.rank)
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
            state.rollback_capable = "rollback" in hello.capabilities
            state.exited_cleanly = False
            state.last_seen = now
            state.phase = "step"
            state.phase_started = now
            state.connected = True
            self._received += 1
            self._tell(now, state, pid, hello)
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

    def _on_collective(self, state: RankState, record: CollectiveRecord, now: float) -> None:
        if record.event == "begin":
            if len(state.in_flight) >= MAX_IN_FLIGHT:
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
            hist = self._collective_hists[hist_key] = Histogram(COLLECTIVE_BUCKETS)
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

    def _rank_samples(self, state: RankState, now: float) -> Iterable[Sample]:
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
            (LOCAL_SAVES_SKIPPED, state.local_saves_skipped),
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
        yield ROLLBACK_CAPABLE.sample(1.0 if state.rollback_capable else 0.0, job=job, rank=rank)
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


COLLECTOR = TrainingCollector
