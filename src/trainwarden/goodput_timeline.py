"""Goodput accounting as a pure state machine: every second of a job goes to exactly one state.

Fed with events carrying explicit timestamps (the daemon's arrival times of client records, the
times of its own restart decisions), it never reads a clock, so a scripted timeline checks it
to the exact second. The definitions (docs/GOODPUT.md):

- time is *open* until the event that closes it arrives: the work since the last step is
  classified by the next step record (`productive` when the step is above the highest step this
  job lineage ever counted, `repeated` when at or below it), a phase's time by its end;
- `checkpointing`, `evaluating` and `initialising` are the client's checkpoint, eval and init
  phases (the blocking part the client reports), carved out of the step interval they sit in;
  a `data` phase is part of the step;
- before the first step of a fresh process everything is `initialising` (and so is the time
  between the last step and a clean goodbye);
- when a restart ends a run, its open time up to the finding is `detecting` and from the
  finding to the first step of the new process `restarting` (start-up and resume included);
- only the job's lowest rank is followed: ranks step in lockstep, and one clock per job keeps
  the states from summing to more than the wall time.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

STATES = (
    "productive",
    "repeated",
    "restarting",
    "detecting",
    "checkpointing",
    "initialising",
    "evaluating",
)
"""Every state a second can be in; the `state` label of `trainwarden_goodput_seconds_total`."""

PHASE_STATES = {"checkpoint": "checkpointing", "eval": "evaluating", "init": "initialising"}
EXTERNAL_CAUSE = "external"
"""A new process for the job that no restart of the daemon's explains (a launcher, a person)."""
OTHER_CAUSE = "other"
FINISH_GRACE_SECONDS = 60.0
"""A restart this soon after the lead rank's goodbye counts the time since the goodbye as the fault's."""
MAX_CAUSES = 16
"""Distinct restart causes kept per job; further ones count as `other` (bounded labels)."""


class Sender(NamedTuple):
    """Which process a client record came from (the pid as SO_PEERCRED gave it).

    A named tuple, not a frozen dataclass: one is built per record on the socket thread, and a
    frozen dataclass's `__init__` costs several times as much.
    """

    job: str
    rank: int
    pid: int


class Mode(enum.StrEnum):
    """Where a job's lead rank is in its life."""

    ABSENT = "absent"  # unknown to this daemon run (never seen, or the daemon restarted)
    INITIALISING = "initialising"  # a fresh process said hello; no step yet
    RUNNING = "running"
    STOPPED = "stopped"  # a new process said hello before any restart was reported
    RESTARTING = "restarting"  # a restart happened; waiting for the first step
    FINISHED = "finished"  # the lead rank said goodbye


@dataclass
class Totals:
    """What survives a daemon restart: committed seconds, counts and the lineage's high-water step."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATES, 0.0))
    steps_repeated: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    high_water: int | None = None
    lead_rank: int | None = None
    lead_pid: int = 0
    last_event_at: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-able form (for the store and /status)."""
        return {
            "seconds": dict(self.seconds),
            "steps_repeated": self.steps_repeated,
            "restarts": dict(self.restarts),
            "high_water": self.high_water,
            "lead_rank": self.lead_rank,
            "lead_pid": self.lead_pid,
            "last_event_at": self.last_event_at,
        }


@dataclass
class _Job:
    totals: Totals = field(default_factory=Totals)
    mode: Mode = Mode.ABSENT
    phase: str | None = None
    opened_at: float = 0.0  # start of the open interval
    step_work: float = 0.0  # open step time before the current phase began
    alive_at: float = 0.0  # last record of the lead process (the earliest it can have died)
    finished_at: float | None = None  # a goodbye whose open time is held (see `bye`)
    episode_counted: bool = False  # this restart episode already has its cause counted


@dataclass(frozen=True)
class JobGoodput:
    """One job's accounting at one instant: committed totals plus the still-open interval."""

    job: str
    mode: str
    seconds: Mapping[str, float]
    steps_repeated: int
    restarts: Mapping[str, int]
    high_water: int | None
    open_seconds: float

    @property
    def wall_seconds(self) -> float:
        """Every second accounted for so far, the open ones included."""
        return sum(self.seconds.values()) + self.open_seconds

    @property
    def ratio(self) -> float | None:
        """Productive over wall; None before any time was accounted."""
        wall = self.wall_seconds
        return self.seconds["productive"] / wall if wall > 0 else None


class GoodputTimeline:
    """Per-job accounting; not thread-safe (the daemon's accountant holds a lock around it)."""

    def __init__(self) -> None:
        self._jobs: dict[str, _Job] = {}

    # --- restoring ---------------------------------------------------------------------------

    def restore(self, job: str, totals: Totals) -> None:
        """Continue from persisted totals; the job is ABSENT until its lead rank says hello."""
        self._jobs[job] = _Job(totals=totals)

    def jobs(self) -> list[str]:
        """Every job accounted for."""
        return sorted(self._jobs)

    def totals(self, job: str) -> Totals | None:
        """The persisted part of `job` (live object; copy before handing it to another thread)."""
        state = self._jobs.get(job)
        return None if state is None else state.totals

    # --- client records ----------------------------------------------------------------------

    def hello(self, t: float, sender: Sender) -> None:
        """A rank's process connected; a new pid of the lead rank is a new process of the job."""
        job, rank, pid = sender.job, sender.rank, sender.pid
        state = self._jobs.setdefault(job, _Job())
        totals = state.totals
        # A higher rank is followed only when the lead has no live process here (restarted and not
        # back, finished, or unknown to this daemon run): the job may now run other ranks here.
        lead_live = totals.lead_pid != 0 and state.mode not in (Mode.ABSENT, Mode.FINISHED)
        if totals.lead_rank is not None and rank > totals.lead_rank and lead_live:
            return
        same_process = rank == totals.lead_rank and pid == totals.lead_pid
        new_lead = totals.lead_rank is not None and rank < totals.lead_rank  # a lower rank joined
        totals.lead_rank, totals.lead_pid = rank, pid
        totals.last_event_at = max(totals.last_event_at, t)
        if same_process:
            if state.mode is Mode.ABSENT:  # the daemon restarted; the job ran on
                state.mode, state.opened_at, state.step_work, state.phase = Mode.RUNNING, t, 0.0, None
            state.alive_at = t
            return
        if new_lead and state.mode in (Mode.RUNNING, Mode.INITIALISING):
            state.alive_at = t  # the same job, followed through another rank from now on
        elif state.mode in (Mode.RUNNING, Mode.INITIALISING):
            state.mode = Mode.STOPPED  # its open time is split once the cause is known
        elif state.mode in (Mode.ABSENT, Mode.FINISHED):
            self._settle(state)
            state.mode, state.opened_at, state.step_work, state.phase = Mode.INITIALISING, t, 0.0, None
            state.alive_at = t

    def step(self, t: float, sender: Sender, step: int) -> None:
        """The lead rank completed `step`: the open step work is productive or repeated."""
        state = self._lead(sender)
        if state is None:
            return
        totals = state.totals
        t = self._advance(state, t)
        if state.mode is Mode.STOPPED:
            self._count(state, EXTERNAL_CAUSE)
            self._end_run(state, t, state.alive_at)
        if state.phase is not None:  # a phase the client never ended ends with the step
            self._commit(state, PHASE_STATES[state.phase], t - state.opened_at)
            state.phase, state.opened_at = None, t
        open_time = state.step_work + (t - state.opened_at)
        repeated = totals.high_water is not None and step <= totals.high_water
        if state.mode is Mode.RESTARTING:
            self._commit(state, "restarting", open_time)
        elif state.mode is Mode.INITIALISING:
            self._commit(state, "initialising", open_time)
        else:
            self._commit(state, "repeated" if repeated else "productive", open_time)
        if repeated:
            totals.steps_repeated += 1
        else:
            totals.high_water = step
        state.mode, state.opened_at, state.step_work, state.episode_counted = Mode.RUNNING, t, 0.0, False
        state.alive_at = t

    def phase(self, t: float, sender: Sender, phase: str, event: str) -> None:
        """The lead rank entered or left a phase; `data` is part of the step and ignored."""
        state = self._lead(sender)
        if state is None or phase not in PHASE_STATES:
            return
        if state.mode not in (Mode.RUNNING, Mode.INITIALISING):
            return  # a restart or a stop owns the time until the first step
        t = self._advance(state, t)
        state.alive_at = t
        if event == "begin":
            if state.phase is not None:
                self._commit(state, PHASE_STATES[state.phase], t - state.opened_at)
            elif state.mode is Mode.RUNNING:
                state.step_work += t - state.opened_at
            else:
                self._commit(state, "initialising", t - state.opened_at)
            state.phase, state.opened_at = phase, t
        elif state.phase == phase:
            self._commit(state, PHASE_STATES[phase], t - state.opened_at)
            state.phase, state.opened_at = None, t

    def bye(self, t: float, sender: Sender) -> None:
        """The lead rank exits cleanly: the clock stops; its open time waits to see if a restart follows.

        A rank told to stop because a peer crashed says goodbye too; when the daemon's restart
        follows within `FINISH_GRACE_SECONDS`, that time is the fault's (`_end_run`), otherwise it
        is shut-down (`initialising`, or the phase it ended in) once `settle` runs.
        """
        state = self._lead(sender)
        if state is None or state.mode in (Mode.ABSENT, Mode.FINISHED):
            return
        t = self._advance(state, t)
        if state.mode is Mode.RESTARTING:
            self._commit(state, "restarting", t - state.opened_at)
            state.mode, state.phase, state.step_work, state.opened_at = Mode.FINISHED, None, 0.0, t
            return
        state.mode, state.finished_at = Mode.FINISHED, t

    def settle(self, now: float) -> None:
        """Commit the held time of goodbyes older than the grace period as shut-down."""
        for state in self._jobs.values():
            if state.finished_at is not None and state.finished_at <= now - FINISH_GRACE_SECONDS:
                self._settle(state)

    # --- the daemon's own timeline -----------------------------------------------------------

    def restart(self, t: float, job: str, cause: str, detected_at: float | None = None) -> None:
        """The daemon restarted `job` at `t` for a finding made at `detected_at` (default `t`)."""
        state = self._jobs.setdefault(job, _Job())
        totals = state.totals
        t = max(t, state.opened_at)
        totals.last_event_at = max(totals.last_event_at, t)
        if state.mode is not Mode.STOPPED:  # (STOPPED: the new process said hello already)
            totals.lead_pid = 0  # a restart replaces the process: late records of the old one are ignored
        if state.mode in (Mode.RUNNING, Mode.INITIALISING, Mode.STOPPED):
            self._count(state, cause)
            self._end_run(state, t, t if detected_at is None else detected_at)
            return
        if state.mode is Mode.RESTARTING:  # restarted again before any step: a second restart
            self._count(state, cause)
            self._commit(state, "restarting", t - state.opened_at)
            state.opened_at = t
            return
        self._count(state, cause)
        if state.finished_at is not None:  # a goodbye the restart overrides: the run had not ended
            state.finished_at = None
            self._end_run(state, t, t if detected_at is None else detected_at)
            return
        state.mode, state.opened_at, state.step_work, state.phase = Mode.RESTARTING, t, 0.0, None

    # --- reading -----------------------------------------------------------------------------

    def snapshot(self, now: float) -> list[JobGoodput]:
        """Every job's goodput at `now` (open time counted up to `now`, never negative)."""
        out = []
        for job in sorted(self._jobs):
            state = self._jobs[job]
            open_seconds = 0.0
            if state.finished_at is not None:
                open_seconds = state.step_work + (state.finished_at - state.opened_at)
            elif state.mode not in (Mode.ABSENT, Mode.FINISHED):
                open_seconds = state.step_work + max(0.0, now - state.opened_at)
            totals = state.totals
            out.append(
                JobGoodput(
                    job=job,
                    mode=state.mode.value,
                    seconds=dict(totals.seconds),
                    steps_repeated=totals.steps_repeated,
                    restarts=dict(totals.restarts),
                    high_water=totals.high_water,
                    open_seconds=open_seconds,
                )
            )
        return out

    def expire(self, before: float) -> list[str]:
        """Forget jobs neither running nor heard from since `before` (bounded series); returns them."""
        gone = [
            job
            for job, state in self._jobs.items()
            if state.mode in (Mode.ABSENT, Mode.FINISHED)
            and state.finished_at is None
            and state.totals.last_event_at < before
        ]
        for job in gone:
            del self._jobs[job]
        return gone

    # --- internals ---------------------------------------------------------------------------

    def _lead(self, sender: Sender) -> _Job | None:
        """The job's state when `sender` is its lead process, else None (other ranks, old processes)."""
        state = self._jobs.get(sender.job)
        if state is None or state.mode is Mode.ABSENT:
            return None
        if state.totals.lead_rank != sender.rank or state.totals.lead_pid != sender.pid:
            return None
        return state

    @staticmethod
    def _advance(state: _Job, t: float) -> float:
        """Events never move time backwards (arrival times are monotonic; a late one is clamped)."""
        t = max(t, state.opened_at)
        state.totals.last_event_at = max(state.totals.last_event_at, t)
        return t

    @staticmethod
    def _commit(state: _Job, what: str, seconds: float) -> None:
        if seconds > 0:
            state.totals.seconds[what] += seconds

    @staticmethod
    def _count(state: _Job, cause: str) -> None:
        restarts = state.totals.restarts
        if cause not in restarts and len(restarts) >= MAX_CAUSES:
            cause = OTHER_CAUSE
        restarts[cause] = restarts.get(cause, 0) + 1
        state.episode_counted = True

    def _settle(self, state: _Job) -> None:
        """A held goodbye becomes shut-down time: `initialising`, or the phase it ended in."""
        if state.finished_at is None:
            return
        what = PHASE_STATES[state.phase] if state.phase is not None else "initialising"
        self._commit(state, "initialising", state.step_work)
        self._commit(state, what, state.finished_at - state.opened_at)
        state.phase, state.step_work, state.opened_at = None, 0.0, state.finished_at
        state.finished_at = None

    def _end_run(self, state: _Job, t: float, detected_at: float) -> None:
        """Split the open time of a run that a restart ended: detecting up to the finding, then restarting."""
        found = min(max(detected_at, state.opened_at), t)
        # A process that never stepped was still starting; a run's unfinished step or phase is
        # the time between its last progress and the finding.
        lost = "initialising" if state.mode is Mode.INITIALISING else "detecting"
        self._commit(state, lost, state.step_work + (found - state.opened_at))
        self._commit(state, "restarting", t - found)
        state.mode, state.phase, state.step_work, state.opened_at = Mode.RESTARTING, None, 0.0, t
