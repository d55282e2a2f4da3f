"""Runs every collector at its own interval, so one slow or broken source never stalls the rest.

APScheduler decides *when* (interval per collector, one instance at a time, coalesced); our own
pool of daemon threads decides *where*: it holds one worker per job, so even if every collector
hung at once each would still have its thread, and a hung thread never blocks process exit.
Python cannot kill a thread, so a watchdog thread instead declares a run that exceeds its
`timeout_seconds` failed (success 0, timeout counted, its series dropped); APScheduler skips
that collector's later runs until the hung call returns, and those skips are counted too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.pool import BasePoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from trainwarden.collectors.base import Collector
from trainwarden.daemon.collector_runs import (
    DURATION,
    ERRORS,
    LAST_SUCCESS,
    RUNS,
    SERIES,
    SKIP_REASONS,
    SKIPPED,
    SUCCESS,
    TIMEOUTS,
    CollectorState,
)
from trainwarden.daemon.worker_pool import DaemonThreadPool
from trainwarden.model import Sample
from trainwarden.store import Store

# The per-collector book-keeping and series live in `collector_runs.py`, the thread pool in
# `worker_pool.py`; re-exported here, where they have always been imported from.
__all__ = [
    "DURATION",
    "ERRORS",
    "LAST_SUCCESS",
    "LOG_EVERY_SECONDS",
    "RUNS",
    "SERIES",
    "SKIPPED",
    "SKIP_REASONS",
    "SOURCE",
    "SUCCESS",
    "TIMEOUTS",
    "CollectorScheduler",
    "CollectorState",
    "DaemonThreadPool",
    "ExtraJob",
]

log = logging.getLogger(__name__)

SOURCE = "scheduler"
"""Store source under which the scheduler's own per-collector series live."""

LOG_EVERY_SECONDS = 60.0
"""A failing collector logs its first failure, then at most one line per this many seconds."""

_APSCHEDULER_LOG = logging.getLogger("trainwarden.apscheduler")
# APScheduler logs every run at INFO and every skip at WARNING; we count and rate-limit those
# ourselves, so only its real errors get through.
_APSCHEDULER_LOG.setLevel(logging.ERROR)


class _Executor(BasePoolExecutor):  # type: ignore[misc]
    """APScheduler executor on a `DaemonThreadPool`, logging through our quiet logger."""

    def __init__(self, pool: DaemonThreadPool) -> None:
        super().__init__(pool)

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._logger = _APSCHEDULER_LOG


@dataclass(frozen=True)
class ExtraJob:
    """A periodic task that is not a collector (the systemd watchdog ping, later the rule engine)."""

    name: str
    func: Callable[[], object]  # the return value is ignored
    interval_seconds: float


class CollectorScheduler:
    """Schedules collectors, times them, stores their samples and keeps their health metrics."""

    def __init__(
        self,
        store: Store,
        collectors: Sequence[Collector],
        *,
        unavailable: Mapping[str, str] | None = None,
        extra_jobs: Iterable[ExtraJob] = (),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_first_round: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._collectors = {c.name: c for c in collectors}
        self._extra = list(extra_jobs)
        self._clock = clock
        self._monotonic = monotonic
        self._on_first_round = on_first_round
        self._lock = threading.Lock()
        self._states: dict[str, CollectorState] = {
            c.name: CollectorState(c.name, c.options.interval_seconds, c.options.timeout_seconds)
            for c in collectors
        }
        for name, why in (unavailable or {}).items():
            self._states[name] = CollectorState(name, 0.0, 0.0, unavailable=why)
        self.first_round = threading.Event()
        self._stop = threading.Event()
        # One worker per job (plus one): a hung job holds at most its own (max_instances=1).
        self._pool = DaemonThreadPool(len(self._collectors) + len(self._extra) + 1)
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": _Executor(self._pool)},
            logger=_APSCHEDULER_LOG,
        )
        self._scheduler.add_listener(self._on_skip, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self._watchdog = threading.Thread(target=self._watch, name="trainwarden-watchdog", daemon=True)
        timeouts = [c.options.timeout_seconds for c in collectors]
        self._min_timeout = min(timeouts, default=1.0)

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Publish initial health series and start running every collector now, then on interval."""
        now = datetime.now(UTC)
        with self._lock:
            samples = [s for state in self._states.values() for s in state.samples()]
        self._store.replace(SOURCE, samples, self._clock())
        count = max(1, len(self._collectors))
        for index, (name, collector) in enumerate(self._collectors.items()):
            interval = collector.options.interval_seconds
            # All run at once first (readiness), then spread over the interval, so they do not
            # queue on the GIL together and the node never sees one burst of all of them.
            phase = timedelta(seconds=interval * index / count)
            self._scheduler.add_job(
                self._run,
                IntervalTrigger(seconds=interval, start_date=now + phase, timezone=UTC),
                args=(name,),
                id=name,
                name=f"collector:{name}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, round(interval)),
                next_run_time=now,
            )
        for job in self._extra:
            self._scheduler.add_job(
                self._run_extra,
                IntervalTrigger(seconds=job.interval_seconds, timezone=UTC),
                args=(job,),
                id=f"job:{job.name}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, round(job.interval_seconds)),
                next_run_time=now,
            )
        self._scheduler.start()
        self._watchdog.start()
        self._maybe_first_round()

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop scheduling; wait up to `grace_seconds` for runs in progress (hung ones are abandoned)."""
        self._stop.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._pool.shutdown(wait=True, timeout=grace_seconds)
        if self._watchdog.is_alive():
            self._watchdog.join(timeout=2.0)

    # --- runs -------------------------------------------------------------------------------

    def _run(self, name: str) -> None:
        collector = self._collectors[name]
        started = self._monotonic()
        with self._lock:
            state = self._states[name]
            state.run_seq += 1
            seq = state.run_seq
            state.running_since = started
        error: BaseException | None = None
        stored = 0
        try:
            samples = list(collector.collect())
        except Exception as exc:
            error = exc
            samples = []
        duration = self._monotonic() - started
        now = self._clock()
        if self._stop.is_set():
            return  # a run that outlived a stop (or a reload) must not write into the store
        with self._lock:
            late = state.timed_out_seq == seq
        if error is None and not late:
            try:
                stored = self._store.replace(name, samples, now)
            except Exception as exc:  # a collector handed us something that is not a Sample
                error = exc
        if error is not None or late:
            self._store.replace(name, (), now)  # a failed source exports nothing stale
        with self._lock:
            late = state.timed_out_seq == seq  # the watchdog may have fired meanwhile
            state.running_since = None
            state.runs += 1
            state.completed_once = True
            if late:
                log.warning(
                    "collector %s finished %.3fs after starting, past its %gs timeout; samples discarded",
                    name,
                    duration,
                    state.timeout,
                )
            elif error is not None:
                state.record_error(duration, error)
                self._log_failure(state, now, f"failed: {state.last_error}", error)
            else:
                if state.failures_in_a_row:
                    log.info("collector %s recovered after %d failure(s)", name, state.failures_in_a_row)
                state.record_success(duration, stored, now)
            samples_out = state.run_samples() if error is None and not late else state.samples()
        self._store.add(SOURCE, samples_out, now)
        self._maybe_first_round()

    def _run_extra(self, job: ExtraJob) -> None:
        try:
            job.func()
        except Exception:
            log.exception("periodic job %s failed", job.name)

    def _log_failure(
        self, state: CollectorState, now: float, message: str, error: BaseException | None
    ) -> None:
        """Log the first failure, then at most one line per LOG_EVERY_SECONDS; caller holds the lock."""
        state.failures_in_a_row += 1
        if now - state.last_logged < LOG_EVERY_SECONDS:
            state.suppressed += 1
            return
        extra = f" ({state.suppressed} similar message(s) suppressed)" if state.suppressed else ""
        state.last_logged = now
        state.suppressed = 0
        exc_info = error if error is not None and state.failures_in_a_row == 1 else None
        log.warning("collector %s %s%s", state.name, message, extra, exc_info=exc_info)

    def _watch(self) -> None:
        """Declare runs that exceed their timeout failed; Python cannot interrupt them.

        Sleeps until the earliest deadline of a run in flight, or for the shortest timeout when
        none is: a run starting meanwhile cannot expire before that, so nothing is missed and an
        idle daemon wakes only once per shortest timeout.
        """
        while not self._stop.wait(self._next_check_in()):
            self.check_timeouts()

    def _next_check_in(self) -> float:
        mono = self._monotonic()
        with self._lock:
            deadlines = [
                s.running_since + s.timeout
                for s in self._states.values()
                if s.running_since is not None and s.timed_out_seq != s.run_seq
            ]
        wait = min([self._min_timeout, *(d - mono for d in deadlines)])
        return max(wait, 0.0) + 0.005  # land just past the deadline, not just before it

    def check_timeouts(self) -> list[str]:
        """One watchdog pass; returns the collectors newly declared timed out."""
        mono = self._monotonic()
        now = self._clock()
        expired: list[str] = []
        published: list[Sample] = []
        with self._lock:
            for state in self._states.values():
                since = state.running_since
                if since is None or state.timed_out_seq == state.run_seq or mono - since <= state.timeout:
                    continue
                state.timed_out_seq = state.run_seq
                state.timeouts += 1
                state.success = False
                state.completed_once = True
                state.duration = mono - since
                state.last_error = f"run exceeded timeout_seconds={state.timeout:g}"
                self._log_failure(state, now, f"hung: {state.last_error}", None)
                expired.append(state.name)
                published.extend(state.samples())
        for name in expired:
            self._store.replace(name, (), now)
        if published:
            self._store.add(SOURCE, published, now)
            self._maybe_first_round()
        return expired

    def _on_skip(self, event: JobEvent) -> None:
        reason = "overlap" if event.code == EVENT_JOB_MAX_INSTANCES else "missed"
        with self._lock:
            state = self._states.get(event.job_id)
            if state is None:
                return
            state.skipped[reason] += 1
            samples = state.samples()
        self._store.add(SOURCE, samples, self._clock())

    def _maybe_first_round(self) -> None:
        if self.first_round.is_set():
            return
        with self._lock:
            done = all(s.completed_once or s.unavailable is not None for s in self._states.values())
            fire = done and not self.first_round.is_set()
            if fire:
                self.first_round.set()
        if fire and self._on_first_round is not None:
            self._on_first_round()

    # --- views ------------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """Per-collector health for `/status` (collector `status()` detail added by the daemon)."""
        with self._lock:
            return {name: state.as_status() for name, state in self._states.items()}
