"""The daemon's goodput accountant: client records and restart decisions in, counters out.

The training collector hands it every applied record (`on_record`, on the socket thread, under
the collector's lock: it only updates memory), the healing tick every outcome (`on_outcome`: an
applied restart is the daemon's own timeline), and once a second a scheduler job publishes the
series (`trainwarden_goodput_*`) and saves the changed totals to the journal's SQLite file, so a
restarted daemon continues them. Nothing here can raise into its callers: a failure is logged
and counted in `trainwarden_goodput_store_errors_total`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trainwarden.daemon.host import DaemonHost
from trainwarden.daemon.scheduler import ExtraJob
from trainwarden.goodput_store import GoodputStore, GoodputStoreError
from trainwarden.goodput_timeline import STATES, GoodputTimeline, JobGoodput, Sender, Totals
from trainwarden.model import MetricKind, MetricSpec, Sample
from trainwarden.protocol import ByeRecord, Hello, PhaseRecord, Record, StepRecord

if TYPE_CHECKING:
    from trainwarden.collectors.base import RecordListener
    from trainwarden.daemon.healing import Healing
    from trainwarden.healers.policy import Outcome
    from trainwarden.store import Store

log = logging.getLogger(__name__)

SOURCE = "goodput"
TICK_SECONDS = 1.0
RETENTION_SECONDS = 7 * 86400.0
"""A job neither running nor heard from for this long leaves the accounting (bounded series)."""
RESTART_HEALERS = frozenset({"checkpoint_restart"})
"""Healers whose applied action replaces the job's processes."""

SECONDS = MetricSpec(
    "trainwarden_goodput_seconds_total",
    "Seconds of the job in each state (productive, repeated, restarting, detecting, checkpointing,"
    " initialising, evaluating); see docs/GOODPUT.md.",
    MetricKind.COUNTER,
    ("job", "state"),
)
STEPS_REPEATED = MetricSpec(
    "trainwarden_goodput_steps_repeated_total",
    "Steps reported at or below the highest step already counted for the job (redone after a resume).",
    MetricKind.COUNTER,
    ("job",),
)
RESTARTS = MetricSpec(
    "trainwarden_goodput_restarts_total",
    "Restarts of the job by cause (the finding's rule, or external for one no daemon action explains).",
    MetricKind.COUNTER,
    ("job", "cause"),
)
RATIO = MetricSpec(
    "trainwarden_goodput_ratio",
    "Productive seconds over every second accounted for the job (0-1), since it was first seen.",
    MetricKind.GAUGE,
    ("job",),
)
STORE_ERRORS = MetricSpec(
    "trainwarden_goodput_store_errors_total",
    "Goodput persistence failures: the table unreadable (load), a damaged row skipped (row), a save failed.",
    MetricKind.COUNTER,
    ("operation",),
)


def job_samples(job: JobGoodput) -> list[Sample]:
    """The series of one job."""
    out = [SECONDS.sample(job.seconds[state], job=job.job, state=state) for state in STATES]
    out.append(STEPS_REPEATED.sample(job.steps_repeated, job=job.job))
    out.extend(RESTARTS.sample(n, job=job.job, cause=cause) for cause, n in sorted(job.restarts.items()))
    ratio = job.ratio
    if ratio is not None:
        out.append(RATIO.sample(ratio, job=job.job))
    return out


def job_status(job: JobGoodput) -> dict[str, Any]:
    """One job's goodput as /status shows it (what `goodput_of` reads back)."""
    return {
        "mode": job.mode,
        "ratio": None if job.ratio is None else round(job.ratio, 6),
        "wall_seconds": round(job.wall_seconds, 6),
        "open_seconds": round(job.open_seconds, 6),
        "seconds": {k: round(v, 6) for k, v in job.seconds.items()},
        "steps_repeated": job.steps_repeated,
        "restarts": dict(job.restarts),
        "high_water": job.high_water,
    }


class GoodputAccountant:
    """Owns one daemon's goodput timeline, its persistence and its series."""

    def __init__(self, state_dir: Path, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self.timeline = GoodputTimeline()
        self._lock = threading.Lock()
        self._errors = {"load": 0, "row": 0, "save": 0}
        self._dirty: set[str] = set()
        self._db: GoodputStore | None = None
        try:
            self._db = GoodputStore.in_state_dir(state_dir)
            restored, problems = self._db.load()
        except GoodputStoreError as exc:
            log.error("goodput is not persisted: %s", exc)  # noqa: TRY400 - a clear message, no traceback
            self._errors["load"] += 1
            return
        for problem in problems:
            log.warning("goodput: %s; that job starts from zero", problem)
        self._errors["row"] += len(problems)
        for job, totals in restored.items():
            self.timeline.restore(job, totals)

    # --- inputs ------------------------------------------------------------------------------

    def on_record(self, now: float, job: str, rank: int, pid: int, record: Record) -> None:
        """One record the training collector accepted (arrival time `now`)."""
        sender = Sender(job, rank, pid)
        try:
            with self._lock:
                if isinstance(record, Hello):
                    self.timeline.hello(now, sender)
                elif isinstance(record, StepRecord):
                    self.timeline.step(now, sender, record.step)
                elif isinstance(record, PhaseRecord):
                    self.timeline.phase(now, sender, record.phase, record.event)
                elif isinstance(record, ByeRecord):
                    self.timeline.bye(now, sender)
                else:
                    return
                self._dirty.add(job)
        except Exception:  # a bug here must not cost the collector its connection
            log.exception("goodput: cannot account a %s record of %s", type(record).__name__, job)

    def on_outcome(self, outcome: Outcome, decided_at: float) -> None:
        """A policy outcome: an applied restart ends the job's run (the finding was at `decided_at`)."""
        job = outcome.finding.subject.get("job", "")
        if not job or outcome.healer not in RESTART_HEALERS or outcome.result != "applied":
            return
        with self._lock:
            self.timeline.restart(self.clock(), job, outcome.finding.rule, detected_at=decided_at)
            self._dirty.add(job)

    # --- outputs -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Publish the series and save what changed (a scheduler job, once a second)."""
        now = self.clock()
        with self._lock:
            self.timeline.settle(now)
            gone = self.timeline.expire(now - RETENTION_SECONDS)
            jobs = self.timeline.snapshot(now)
            dirty = {job: self._copy(job) for job in self._dirty}
            self._dirty.clear()
        samples = [sample for job in jobs for sample in job_samples(job)]
        samples.extend(STORE_ERRORS.sample(n, operation=op) for op, n in self._errors.items())
        self.store.replace(SOURCE, samples, now)
        self._save({job: t for job, t in dirty.items() if t is not None}, gone, now)

    def _copy(self, job: str) -> Totals | None:
        totals = self.timeline.totals(job)
        if totals is None:
            return None
        return Totals(
            seconds=dict(totals.seconds),
            steps_repeated=totals.steps_repeated,
            restarts=dict(totals.restarts),
            high_water=totals.high_water,
            lead_rank=totals.lead_rank,
            lead_pid=totals.lead_pid,
            last_event_at=totals.last_event_at,
        )

    def _save(self, dirty: Mapping[str, Totals], gone: list[str], now: float) -> None:
        if self._db is None or not (dirty or gone):
            return
        try:
            if dirty:
                self._db.save(dirty, now)
            if gone:
                self._db.delete(gone)
        except GoodputStoreError as exc:
            self._errors["save"] += 1
            log.warning("goodput: %s", exc)
            with self._lock:
                self._dirty.update(dirty)  # try again at the next tick

    def status(self) -> dict[str, Any]:
        """Per-job goodput and the persistence state, for /status."""
        with self._lock:
            jobs = self.timeline.snapshot(self.clock())
        return {
            "jobs": {job.job: job_status(job) for job in jobs},
            "persisted": None if self._db is None else str(self._db.path),
            "errors": {k: v for k, v in self._errors.items() if v},
        }

    def close(self) -> None:
        """Save everything once more (held goodbyes settled) and close the database."""
        with self._lock:
            self.timeline.settle(math.inf)
        self.tick()
        if self._db is not None:
            self._db.close()
            self._db = None


class GoodputHost(DaemonHost, Protocol):
    """The daemon as the accountant sees it: a Protocol, so goodput.py need not import app.py (no cycle)."""

    @property
    def record_listeners(self) -> list[RecordListener]:
        """Told of every client record, before the collectors start."""
        ...

    @property
    def healing(self) -> Healing | None:
        """The daemon's detect-and-heal, whose outcomes the accountant hears."""
        ...

    @property
    def stop_hooks(self) -> list[Callable[[], None]]:
        """Run once the collectors stopped (final saves)."""
        ...


def install_goodput(daemon: GoodputHost) -> GoodputAccountant:
    """Wire an accountant into `daemon`: record listener, outcome listener, tick and /status section."""
    accountant = GoodputAccountant(daemon.config.daemon.state_dir, daemon.store, daemon.clock)
    daemon.record_listeners.append(accountant.on_record)
    if daemon.healing is not None:
        daemon.healing.outcome_listeners.append(accountant.on_outcome)
    daemon.extra_jobs.append(ExtraJob("goodput", accountant.tick, TICK_SECONDS))
    daemon.status_sections["goodput"] = accountant.status
    daemon.stop_hooks.append(accountant.close)
    return accountant
