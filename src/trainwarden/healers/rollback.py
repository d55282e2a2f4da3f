"""Rollback: ask a job to roll back in place to its last good snapshot, skipping the bad batch.

For a healthy-but-bad job (a non-finite loss or gradient; an unabsorbed spike when spike actions
are routed here) whose every rank said in its hello that it can (`Snapshotter`, capability
`rollback`, exported as `trainwarden_train_rollback_capable`). The healer writes
`rollback_request = {id, step}` (the first bad step from the finding's evidence) into the job's
control file; the ranks agree at their next boundary, restore the snapshot and skip that batch,
without a process restart. The policy skips this rung for a job that cannot roll back
(`can_act`), so its next rung (checkpoint-restart) acts at once.

It took effect when the job's step records go back (a lower step after one at or past the bad step);
a non-finite value seen after that is evidence that the rollback did not heal, and the policy
climbs to the next rung. When the steps went back before the request (the job's own check, a NaN or
with `SpikeCheck` a loss spike, rolled it back first), nothing is written: the action is a no-op, so
a request naming another step of the same fault (the rule's worst spike point, not the job's first)
cannot roll a healed job back a second time. Idempotent: the same action key is written once; a
dry run reads only::

    [policy.routes]
    nonfinite = ["rollback", "checkpoint_restart"]           # the default
    spike = ["clip", "rollback", "checkpoint_restart"]       # opt in, like every spike action
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trainwarden.config import PluginOptions
from trainwarden.control import (
    MAX_REQUEST_CHARS,
    ControlFileError,
    ControlState,
    RollbackRequest,
    control_path,
    read_control,
    write_control,
)
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer
from trainwarden.model import Finding
from trainwarden.protocol import default_control_dir

log = logging.getLogger(__name__)

CAPABLE = "trainwarden_train_rollback_capable"
TRAIN_STEP = "trainwarden_train_step"
LOOKBACK_SECONDS = 120.0
"""How far before the action the step records are searched: the job may roll back on its own first."""


@dataclass(frozen=True)
class RollbackOptions(PluginOptions):
    """`control_dir` defaults to `<runtime_dir>/control`, where the client looks for its control file."""

    control_dir: Path | None = None
    # A spike finding on a job that can roll back waits until the job reported this many steps past
    # the bad step, so the job's own check (`Snapshotter(spike=SpikeCheck())`) rolls it back first and
    # the daemon does not also clip or restart a run that heals itself. 0: act at once.
    job_first_steps: int = 10

    def problems(self) -> list[tuple[str, str]]:
        """A step count, not negative."""
        found = super().problems()
        if not 0 <= self.job_first_steps <= 1_000_000:
            found.append(("job_first_steps", "must be a step count in 0..1000000"))
        return found


class RollbackHealer(Healer):
    """Writes `ControlState.rollback_request` for the job named in the action's subject."""

    name = "rollback"
    Options = RollbackOptions

    def can_act(self, subject: Mapping[str, str]) -> bool:
        """Whether every reporting rank of the job advertised the rollback capability (at least one)."""
        store = self.context.store
        job = subject.get("job")
        if store is None or not job:
            return False
        values = [s.value for s in store.find(CAPABLE) if dict(s.labels).get("job") == job]
        return bool(values) and all(value == 1.0 for value in values)

    def control_file(self, job: str) -> Path:
        """The control file of `job`."""
        options = self.options
        assert isinstance(options, RollbackOptions)
        directory = options.control_dir or default_control_dir(self.context.runtime_dir)
        return control_path(directory, job)

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:  # noqa: PLR0911 - one return per checked state
        """Write the rollback request (once per action key)."""
        job = action.subject.get("job", "")
        step = _first_bad_step(action)
        if step is None:
            return ActionResult(ActionOutcome.FAILED, "the finding names no bad step to roll back before")
        if not self.can_act(action.subject):
            return ActionResult(ActionOutcome.FAILED, f"job {job!r} did not say it can roll back")
        try:
            path = self.control_file(job)
            state = read_control(path) if path.exists() else ControlState(job=job)
        except ControlFileError as exc:
            # never overwrite a file we cannot read: it may hold a checkpoint or stop request
            return ActionResult(ActionOutcome.FAILED, f"control file of job {job!r} unusable: {exc}")
        request = RollbackRequest(request_id(action.key), step)
        data: dict[str, str | float | int | bool] = {"job": job, "first_bad_step": step}
        back = self._went_back(job, step, self.context.clock() - LOOKBACK_SECONDS)
        if back is not None:
            return ActionResult(
                ActionOutcome.NOOP, f"job {job} already rolled back past step {step} by itself", data
            )
        if state.rollback_request == request:
            return ActionResult(ActionOutcome.NOOP, f"rollback before step {step} already requested", data)
        change = f"roll job {job} back to a snapshot before step {step}, skipping batch {step}"
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would {change}", data)
        new_state = dataclasses.replace(
            state, job=job, rollback_request=request, updated_at=self.context.clock()
        )
        try:
            write_control(path, new_state)
        except OSError as exc:
            return ActionResult(ActionOutcome.FAILED, f"cannot write {path}: {exc.strerror or exc}", data)
        log.info("rollback: %s", change)
        return ActionResult(ActionOutcome.APPLIED, f"requested: {change}", data)

    def took_effect(self, action: Action, applied_at: float) -> float | None:
        """When the job's steps went back below the bad step (never before `applied_at`); None until then.

        A job that rolled back on its own before the request counts as rolled back when the action
        was applied: a non-finite value after that means the rollback did not heal.
        """
        job = action.subject.get("job", "")
        first = _first_bad_step(action)
        if self.context.store is None or first is None:
            return applied_at
        back = self._went_back(job, first, applied_at - LOOKBACK_SECONDS)
        if back is None:
            return None
        return max(applied_at, back)

    def _went_back(self, job: str, first: int, since: float) -> float | None:
        """When the job's steps first went back below a step at or past `first`, since `since`."""
        store = self.context.store
        if store is None:
            return None
        back: list[float] = []
        for labels, points in store.windows(TRAIN_STEP):
            if dict(labels).get("job") != job:
                continue
            highest = -1.0
            for point in points:
                if point.timestamp < since:
                    continue
                # back below a step reached at or after the bad one (the bad batch itself is skipped)
                if point.value < highest and highest >= first:
                    back.append(point.timestamp)
                    break
                highest = max(highest, point.value)
        return min(back, default=None)

    def healed_by_job(self, finding: Finding) -> str | None:
        """Why `finding` needs no action, if the job rolled back past its bad step by itself; else None.

        That is: the job can roll back, and its steps went back below the bad step (or one after it)
        at or after the finding's newest bad point (`observed_at`). A fault seen again after that
        rollback (a NaN the job stopped rolling back) has a newer point, and is acted on as usual.
        """
        job = finding.subject.get("job", "")
        step = _bad_step(finding.evidence)
        observed = finding.evidence.get("observed_at")
        if step is None or not isinstance(observed, int | float) or not self.can_act(finding.subject):
            return None
        if self._went_back(job, step, float(observed)) is None:
            return None
        return f"job {job} rolled back past step {step} by itself after the newest bad point"

    def waiting_for_job(self, finding: Finding) -> str | None:
        """Why a spike finding waits for the job's own rollback (`job_first_steps`); None to act now.

        The job's check decides at its next snapshot boundary, a few steps after the bad one; until
        the job reported `job_first_steps` steps past it, acting would race that rollback. A job that
        went back meanwhile is `healed_by_job`; one that trained on past the steps without going back
        did not catch the spike, and the route acts.
        """
        wait = self.opts.job_first_steps
        if finding.rule != "spike" or wait <= 0 or not self.can_act(finding.subject):
            return None
        step = _bad_step(finding.evidence)
        if step is None:
            return None
        job = finding.subject.get("job", "")
        newest = self._newest_step(job)
        if newest is not None and newest >= step + wait:
            return None
        return f"job {job} can roll back by itself: waiting until it reports step {step + wait}"

    @property
    def opts(self) -> RollbackOptions:
        """Typed options."""
        assert isinstance(self.options, RollbackOptions)
        return self.options

    def _newest_step(self, job: str) -> float | None:
        """The highest step any rank of `job` reported last (None before any)."""
        store = self.context.store
        if store is None:
            return None
        latest = [
            points[-1].value
            for labels, points in store.windows(TRAIN_STEP)
            if points and dict(labels).get("job") == job
        ]
        return max(latest, default=None)

    def new_fault(self, acted_on: Mapping[str, object], finding: Finding) -> bool:
        """A new non-finite episode whose first bad step lies past the one rolled back is a new fault.

        The rollback skipped that batch and the job trained on past it, so the rollback worked; a
        second bad batch gets a rollback of its own, not a restart. A new episode at or before the old
        step (the job never got past it) is still evidence that the rollback did not heal; so is the
        same episode persisting (the job stopped rolling back after `max_rollbacks`).
        """
        before, now = _bad_step(acted_on), _bad_step(finding.evidence)
        return before is not None and now is not None and now > before


def _bad_step(source: Mapping[str, object]) -> int | None:
    value = source.get("first_step", source.get("step"))
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**53:
        return int(value)
    return None


def _first_bad_step(action: Action) -> int | None:
    """The finding's first bad step, from the action's params (or, when journaled, its evidence)."""
    for source in (action.params, action.evidence):
        step = _bad_step(source)
        if step is not None:
            return step
    return None


def request_id(action_key: str) -> str:
    """The control file's request id: the action key, or its digest when too long for the field."""
    if len(action_key) <= MAX_REQUEST_CHARS:
        return action_key
    return "sha256:" + hashlib.sha256(action_key.encode()).hexdigest()


HEALER = RollbackHealer
