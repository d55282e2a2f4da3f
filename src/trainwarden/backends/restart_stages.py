"""A restart measured stage by stage: from the fault to the first new step, each stage with its own time.

Marks, in the order a restart passes them (each a wall-clock time on this node):

- `fault`: the crash seen (the exit watcher's wake-up) or, for other faults, when the finding began;
- `decided`: the policy took the restart;
- `kill_started`, `killed`: the old process tree signalled, and gone;
- `spawned`: the new command started (the launcher, e.g. torchrun);
- `process_started`: the last local rank's process created (from /proc, at its hello);
- `imported`, `rendezvous`, `checkpoint_loaded`: reported by each rank (`Reporter.startup`), the
  slowest rank's time, since every rank waits for the slowest at the first collective;
- `first_step`: the first step record of the new run.

A stage is named after the mark that ends it and lasts from the previous mark present; a client that
reports no start-up stages leaves them out, and `first_step` then spans them. The stages ours to cut
are detect, capture (stacks of a hung job), kill, and checkpoint load; process start, imports and
rendezvous belong to the launcher and torch. Each completed restart is appended to a JSON-lines file
(the journal of restarts, one line each), kept in `status()` and exported as gauges of the last one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.model import MetricSpec, Sample

log = logging.getLogger(__name__)

MARKS = (
    "fault",
    "decided",
    "kill_started",
    "killed",
    "spawned",
    "process_started",
    "imported",
    "rendezvous",
    "checkpoint_loaded",
    "first_step",
)
STAGE_NAMES = {
    "decided": "detect",
    "kill_started": "capture",
    "killed": "kill",
    "spawned": "spawn",
    "process_started": "process_start",
    "imported": "imports",
    "rendezvous": "rendezvous",
    "checkpoint_loaded": "checkpoint_load",
    "first_step": "first_step",
}
STAGES = tuple(STAGE_NAMES.values())
HISTORY = 32  # completed restarts kept in memory for /status
FAULT_TTL_SECONDS = 60.0  # a fault seen longer ago than this before a restart began is not its cause
LATEST_OF_RANKS = frozenset({"process_started", "imported", "rendezvous", "checkpoint_loaded"})

STAGE_SECONDS = MetricSpec(
    "trainwarden_restart_stage_seconds",
    "Seconds each stage of the job's last measured restart took (detect, capture, kill, spawn, "
    "process_start, imports, rendezvous, checkpoint_load, first_step).",
    labelnames=("job", "stage"),
)
RESTART_SECONDS = MetricSpec(
    "trainwarden_restart_last_seconds",
    "Seconds from the fault to the first new step of the job's last measured restart.",
    labelnames=("job",),
)
STEPS_REPEATED = MetricSpec(
    "trainwarden_restart_last_steps_repeated",
    "Steps the job's last measured restart repeats (done before the fault, done again after it).",
    labelnames=("job",),
)


@dataclass
class RestartTimeline:
    """One restart of one job: its marks so far, and the steps around it."""

    job: str
    restart: int
    marks: dict[str, float] = field(default_factory=dict)
    last_step_before: int | None = None
    first_step_after: int | None = None
    cause: str = ""
    notes: dict[str, int] = field(default_factory=dict)  # counts of the new run, e.g. warm_ranks

    def mark(self, name: str, at: float) -> None:
        """Set a mark; rank-reported marks keep the slowest rank's time, the others their first."""
        if name in LATEST_OF_RANKS:
            self.marks[name] = max(at, self.marks.get(name, at))
        else:
            self.marks.setdefault(name, at)

    def stages(self) -> dict[str, float]:
        """Seconds per stage, each from the previous mark present (never negative)."""
        out: dict[str, float] = {}
        previous: float | None = None
        for name in MARKS:
            at = self.marks.get(name)
            if at is None:
                continue
            if previous is not None and name in STAGE_NAMES:
                out[STAGE_NAMES[name]] = round(max(0.0, at - previous), 4)
            previous = at if previous is None else max(previous, at)
        return out

    def total(self) -> float | None:
        """Fault (or, without one, the decision) to the first new step."""
        end = self.marks.get("first_step")
        start = self.marks.get("fault", self.marks.get("decided", self.marks.get("kill_started")))
        return None if end is None or start is None else round(end - start, 4)

    def steps_repeated(self) -> int | None:
        """Steps done before the fault that the new run does again."""
        if self.last_step_before is None or self.first_step_after is None:
            return None
        return max(0, self.last_step_before - self.first_step_after + 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (the journal line and /status entry)."""
        return {
            "job": self.job,
            "restart": self.restart,
            "cause": self.cause,
            "marks": {k: round(v, 4) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])},
            "stages": self.stages(),
            "total_seconds": self.total(),
            "last_step_before": self.last_step_before,
            "first_step_after": self.first_step_after,
            "steps_repeated": self.steps_repeated(),
            **({"notes": dict(self.notes)} if self.notes else {}),
        }


class RestartStages:
    """Collects the marks of each job's restarts as they happen; thread-safe (several threads mark)."""

    def __init__(
        self, journal: Path | None = None, on_complete: Callable[[RestartTimeline], None] | None = None
    ) -> None:
        self._journal = journal
        self._on_complete = on_complete
        self._lock = threading.Lock()
        self._open: dict[str, RestartTimeline] = {}
        self._faults: dict[str, tuple[float, str]] = {}  # job -> (time, cause) of a fault not yet acted on
        self._last_step: dict[str, int] = {}
        self._done: deque[RestartTimeline] = deque(maxlen=HISTORY)
        self._restarts: dict[str, int] = {}

    # --- inputs -------------------------------------------------------------------------------

    def fault(self, job: str, at: float, cause: str) -> None:
        """A fault of `job` was seen at `at` (kept until the restart that answers it begins)."""
        with self._lock:
            self._faults.setdefault(job, (at, cause))

    def restart_began(self, job: str, at: float) -> None:
        """The backend starts killing `job` for a restart: a new timeline opens."""
        with self._lock:
            earlier = self._open.pop(job, None)
            if earlier is not None and "first_step" in earlier.marks:
                self._done.append(earlier)  # back, but its decision never came: it ends here
            else:
                earlier = None
            count = self._restarts[job] = self._restarts.get(job, 0) + 1
            timeline = RestartTimeline(job, count, last_step_before=self._last_step.get(job))
            fault = self._faults.pop(job, None)
            if fault is not None and at - FAULT_TTL_SECONDS <= fault[0] <= at:
                timeline.mark("fault", fault[0])
                timeline.cause = fault[1]
            timeline.mark("kill_started", at)
            self._open[job] = timeline
        if earlier is not None:
            self._completed(earlier)

    def mark(self, job: str, name: str, at: float) -> None:
        """Set mark `name` on `job`'s open restart, if one is open."""
        if name not in MARKS:
            raise ValueError(f"restart mark {name!r} is not one of {list(MARKS)}")
        with self._lock:
            timeline = self._open.get(job)
            if timeline is not None:
                timeline.mark(name, at)

    def count(self, job: str, name: str) -> None:
        """Count one `name` (e.g. a rank that started warm) on `job`'s open restart, if one is open."""
        with self._lock:
            timeline = self._open.get(job)
            if timeline is not None:
                timeline.notes[name] = timeline.notes.get(name, 0) + 1

    def decided(self, job: str, at: float, cause: str, fault_at: float | None) -> None:
        """The policy's decision behind `job`'s open restart: when, for what, and when that fault began."""
        with self._lock:
            timeline = self._open.get(job)
            if timeline is None:
                return
            timeline.mark("decided", at)
            timeline.cause = cause  # the finding the policy acted on
            if fault_at is not None and fault_at <= at:
                timeline.mark("fault", fault_at)
            if "first_step" not in timeline.marks:
                return
            del self._open[job]  # the job was back before its healer had returned
            self._done.append(timeline)
        self._completed(timeline)

    def step(self, job: str, step: int, at: float) -> None:
        """A step record of `job`: the first one after a restart completes its timeline."""
        with self._lock:
            timeline = self._open.get(job)
            if timeline is None:
                # the highest of this run (ranks' records interleave); a restart's first step resets it
                self._last_step[job] = max(step, self._last_step.get(job, step))
                return
            if "spawned" not in timeline.marks:
                return  # a record of the old run, read after the kill began
            if "first_step" in timeline.marks:
                return  # back already, awaiting the decision's mark
            timeline.mark("first_step", at)
            timeline.first_step_after = step
            self._last_step[job] = step
            if "decided" not in timeline.marks:
                return
            del self._open[job]
            self._done.append(timeline)
        self._completed(timeline)

    def _completed(self, timeline: RestartTimeline) -> None:
        job = timeline.job
        log.info("restart of job %s measured: %s", job, timeline.as_dict()["stages"])
        self._write(timeline)
        if self._on_complete is not None:
            try:
                self._on_complete(timeline)
            except Exception:
                log.exception("restart stages: completion callback failed")

    def forget_steps(self, job: str) -> None:
        """A run of `job` that ends for good: its step numbers say nothing about the next one."""
        with self._lock:
            self._last_step.pop(job, None)

    # --- outputs ------------------------------------------------------------------------------

    def _write(self, timeline: RestartTimeline) -> None:
        if self._journal is None:
            return
        try:
            self._journal.parent.mkdir(parents=True, exist_ok=True)
            with self._journal.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(timeline.as_dict()) + "\n")
        except OSError as exc:
            log.warning("restart stages: cannot append to %s: %s", self._journal, exc)

    def completed(self) -> list[RestartTimeline]:
        """The completed restarts kept in memory, oldest first."""
        with self._lock:
            return list(self._done)

    def status(self) -> Mapping[str, Any]:
        """Open and recent restarts for /status."""
        with self._lock:
            return {
                "open": [t.as_dict() for t in self._open.values()],
                "completed": [t.as_dict() for t in self._done],
                "journal": None if self._journal is None else str(self._journal),
            }

    def samples(self) -> list[Sample]:
        """Gauges of each job's last completed restart."""
        with self._lock:
            last: dict[str, RestartTimeline] = {t.job: t for t in self._done}
        out: list[Sample] = []
        for job, timeline in sorted(last.items()):
            out.extend(
                STAGE_SECONDS.sample(seconds, job=job, stage=stage)
                for stage, seconds in timeline.stages().items()
            )
            total = timeline.total()
            if total is not None:
                out.append(RESTART_SECONDS.sample(total, job=job))
            repeated = timeline.steps_repeated()
            if repeated is not None:
                out.append(STEPS_REPEATED.sample(repeated, job=job))
        return out


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The restarts journaled at `path` (bench scripts, tests); a damaged line is skipped."""
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out
