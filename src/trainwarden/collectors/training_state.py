"""Per-rank state of the training collector and how each client record updates it.

Pure bookkeeping under the collector's lock: no sockets, no clock reads (arrival times are
passed in), so the record handlers are testable on their own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from trainwarden.collectors.training_metrics import STEP_BUCKETS
from trainwarden.model import MetricSpec, Sample
from trainwarden.protocol import CheckpointRecord, ClipRecord, PhaseRecord, StepRecord

PENDING_POINTS = 4096  # per windowed series between two collections; older ones are dropped
MAX_IN_FLIGHT = 1024  # collectives begun and not ended per rank; a leak must not grow forever


class Histogram:
    """Cumulative-on-render bucket counts."""

    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one value in its bucket."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.total += value

    def samples(self, spec: MetricSpec, **labels: str) -> Iterable[Sample]:
        """The `_bucket` (cumulative), `_sum` and `_count` samples."""
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            yield spec.sample(running, None, "_bucket", le=_le(bound), **labels)
        yield spec.sample(self.count, None, "_bucket", le="+Inf", **labels)
        yield spec.sample(self.total, None, "_sum", **labels)
        yield spec.sample(self.count, None, "_count", **labels)


def _le(bound: float) -> str:
    return repr(float(bound))


class Series:
    """Latest (timestamp, value) plus the points not yet handed to the store."""

    __slots__ = ("latest", "pending")

    def __init__(self) -> None:
        self.latest: tuple[float, float] | None = None
        self.pending: deque[tuple[float, float]] = deque(maxlen=PENDING_POINTS)

    def add(self, timestamp: float, value: float) -> None:
        """Record one point; it is handed to the store at the next collection."""
        self.latest = (timestamp, value)
        self.pending.append((timestamp, value))

    def samples(self, spec: MetricSpec, **labels: str) -> Iterable[Sample]:
        """The points not yet handed on, oldest first, then the latest again."""
        while self.pending:
            ts, value = self.pending.popleft()
            yield spec.sample(value, ts, "", **labels)
        if self.latest is not None:
            # Same (time, value) as the last point: the store does not append it twice.
            yield spec.sample(self.latest[1], self.latest[0], "", **labels)


@dataclass
class RankState:
    """Everything the daemon knows about one rank."""

    job: str
    rank: int
    local_rank: int = 0
    world_size: int = 1
    pid: int = 0
    restart_count: int = 0
    last_seen: float = 0.0
    last_step_ts: float | None = None
    step: Series = field(default_factory=Series)
    step_seconds: Series = field(default_factory=Series)
    loss: Series = field(default_factory=Series)
    grad_norm: Series = field(default_factory=Series)
    phase_seconds: dict[str, Series] = field(default_factory=dict)
    step_hist: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    lr: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    phase: str = "step"
    phase_started: float = 0.0
    in_flight: dict[int, float] = field(default_factory=dict)
    last_checkpoint_step: int | None = None
    last_checkpoint_ts: float | None = None
    last_checkpoint_path: str = ""
    local_saves_skipped: int | None = None  # the client's cumulative count (resets with the process)
    clip_z_threshold: float | None = None
    dropped_base: int = 0  # drops reported by earlier processes of this rank
    dropped_reported: int = 0
    connected: bool = False
    stack_file: str = ""
    rollback_capable: bool = False  # its hello advertised an in-place rollback
    exited_cleanly: bool = False


def on_step(state: RankState, record: StepRecord, now: float) -> None:
    """A completed step: its windowed points and the derived rates."""
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


def on_report(state: RankState, record: CheckpointRecord | ClipRecord, now: float) -> None:
    """A checkpoint saved, or the clip settings the rank runs with."""
    if isinstance(record, ClipRecord):
        state.clip_z_threshold = record.z_threshold
        return
    state.last_checkpoint_step = record.step
    state.last_checkpoint_ts = now
    state.last_checkpoint_path = record.path
    if record.local_skipped is not None:
        state.local_saves_skipped = record.local_skipped


def on_phase(state: RankState, record: PhaseRecord, now: float) -> None:
    """Entering a phase, or leaving it (its duration becomes one windowed point)."""
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
            series = state.phase_seconds[record.phase] = Series()
        series.add(now, seconds)
    state.phase = "step"
    state.phase_started = now
