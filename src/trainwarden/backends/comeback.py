"""Every restart is checked: the job must be back (a step from its ranks) within a bound, or it escalates.

A restart that nobody checks can leave a job hung in set-up for good (torchrun's workers waiting
in a gloo re-rendezvous that cannot succeed) while the daemon believes it healed. So each applied
restart opens an expectation: the job is *back* once any of its ranks reports a step that arrived
after the restart (a hello alone is not enough: a rank can say hello and then hang in set-up).
Until then, and once the bound is over, the watch reports a firing `restart_unanswered` finding
on the job; the policy walks its ladder from there (another restart, the next rung, or giving up
with an alert), and the finding resolves when the job is back.

The bound is `restart_deadline_seconds` when set, else `restart_deadline_factor` times the longest
start-up time this job has shown (after an earlier restart, or, under `trainwarden run`, from the
child's start to its first step), never below `restart_deadline_floor_seconds`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from trainwarden.model import Finding, FindingState, RankProcess, Severity

RULE = "restart_unanswered"
MAX_JOBS = 256  # jobs with a start-up history; a node runs a handful


@dataclass(frozen=True)
class DeadlineOptions:
    """How long a restarted job may take to be back."""

    fixed_seconds: float = 0.0  # > 0: this bound, whatever was observed
    floor_seconds: float = 120.0
    factor: float = 3.0


@dataclass
class _Expectation:
    job: str
    restarted_at: float
    deadline_seconds: float
    action_key: str
    healer: str
    back_at: float | None = None
    overdue_since: float | None = None


@dataclass
class RestartWatch:
    """Expectations opened by restarts, and the findings they raise while a job is not back."""

    options: DeadlineOptions = field(default_factory=DeadlineOptions)
    _open: dict[str, _Expectation] = field(default_factory=dict)
    _startup: dict[str, float] = field(default_factory=dict)  # longest observed start-up per job
    _last: dict[str, dict[str, Any]] = field(default_factory=dict)  # outcome of each job's last expectation
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def deadline_for(self, job: str) -> float:
        """The bound for `job`'s next restart."""
        opts = self.options
        if opts.fixed_seconds > 0:
            return opts.fixed_seconds
        return max(opts.floor_seconds, opts.factor * self._startup.get(job, 0.0))

    def expect(self, job: str, now: float, *, action_key: str, healer: str) -> None:
        """A restart of `job` was applied at `now`: it must be back within the bound."""
        with self._lock:
            self._open[job] = _Expectation(job, now, self.deadline_for(job), action_key, healer)

    def check(self, now: float, last_step_at: Callable[[str], float | None]) -> list[Finding]:
        """Findings for open expectations: firing while overdue, resolved once the job is back.

        `last_step_at(job)` is when the newest step record of any of the job's ranks arrived.
        """
        out: list[Finding] = []
        with self._lock:
            for job, exp in list(self._open.items()):
                stepped = last_step_at(job)
                if stepped is not None and stepped > exp.restarted_at:
                    exp.back_at = stepped
                    self._learn(job, stepped - exp.restarted_at)
                    self._last[job] = self._summary(exp, "back")
                    del self._open[job]
                    if exp.overdue_since is not None:
                        out.append(self._finding(exp, FindingState.RESOLVED, now))
                    continue
                if now - exp.restarted_at >= exp.deadline_seconds:
                    if exp.overdue_since is None:
                        exp.overdue_since = exp.restarted_at + exp.deadline_seconds
                    self._last[job] = self._summary(exp, "overdue", now)
                    out.append(self._finding(exp, FindingState.FIRING, now))
        return out

    def observe_startup(self, job: str, seconds: float) -> None:
        """A start-up seen outside a restart (the first start of `trainwarden run`'s child)."""
        if seconds >= 0:
            with self._lock:
                self._learn(job, seconds)

    def knows_startup(self, job: str) -> bool:
        """True once a start-up time of `job` was observed."""
        return job in self._startup

    def _learn(self, job: str, seconds: float) -> None:
        if job not in self._startup and len(self._startup) >= MAX_JOBS:
            del self._startup[next(iter(self._startup))]
        self._startup[job] = max(self._startup.get(job, 0.0), seconds)

    def _finding(self, exp: _Expectation, state: FindingState, now: float) -> Finding:
        assert exp.overdue_since is not None
        waited = (exp.back_at if exp.back_at is not None else now) - exp.restarted_at
        if state is FindingState.RESOLVED:
            summary = (
                f"job {exp.job} is back {waited:.0f}s after its restart (bound {exp.deadline_seconds:.0f}s)"
            )
        else:
            summary = (
                f"job {exp.job} is not back {waited:.0f}s after {exp.healer} restarted it "
                f"(no step from any rank; bound {exp.deadline_seconds:.0f}s)"
            )
        return Finding(
            RULE,
            {"job": exp.job},
            Severity.CRITICAL,
            summary,
            state=state,
            since=exp.overdue_since,
            evidence={
                "restarted_at": exp.restarted_at,
                "waited_seconds": round(waited, 3),
                "deadline_seconds": exp.deadline_seconds,
                "after_action": exp.action_key,
                "interruption": "transient",
            },
            source="restart_watch",
        )

    def _summary(self, exp: _Expectation, state: str, now: float | None = None) -> dict[str, Any]:
        end = exp.back_at if exp.back_at is not None else now
        return {
            "state": state,
            "restarted_at": exp.restarted_at,
            "deadline_seconds": exp.deadline_seconds,
            "seconds": None if end is None else round(end - exp.restarted_at, 3),  # to back, or waited so far
            "action": exp.action_key,
        }

    def status(self) -> dict[str, Any]:
        """Per job: the open expectation (waiting/overdue) or how the last one ended; for /status."""
        with self._lock:
            jobs: dict[str, Any] = {job: dict(info) for job, info in self._last.items()}
            for job, exp in self._open.items():
                if exp.overdue_since is None:
                    jobs[job] = {
                        **self._summary(exp, "waiting"),
                        "deadline_at": exp.restarted_at + exp.deadline_seconds,
                    }
            return {
                "jobs": jobs,
                "startup_seconds": dict(self._startup),
                "bound": {
                    "fixed_seconds": self.options.fixed_seconds,
                    "floor_seconds": self.options.floor_seconds,
                    "factor": self.options.factor,
                },
            }


LAST_STEP_TS = "trainwarden_train_last_step_timestamp_seconds"


class _Ranks(Protocol):
    def processes(self, job: str) -> Sequence[RankProcess]: ...


class _Values(Protocol):
    def value(self, name: str, **labels: str) -> float | None: ...


def last_step_at(store: _Values, jobs: _Ranks | None, job: str) -> float | None:
    """When the newest step record of any known rank of `job` arrived (the store's view), or None."""
    if jobs is None:
        return None
    stamps = [store.value(LAST_STEP_TS, job=job, rank=str(r.rank)) for r in jobs.processes(job)]
    return max((s for s in stamps if s is not None), default=None)


def options_from(healer: object) -> DeadlineOptions:
    """The bound configured under `[healers.checkpoint_restart]` (defaults where a key is absent)."""
    healer_options = getattr(healer, "options", None)
    defaults = DeadlineOptions()
    return DeadlineOptions(
        fixed_seconds=float(getattr(healer_options, "restart_deadline_seconds", defaults.fixed_seconds)),
        floor_seconds=float(
            getattr(healer_options, "restart_deadline_floor_seconds", defaults.floor_seconds)
        ),
        factor=float(getattr(healer_options, "restart_deadline_factor", defaults.factor)),
    )
