"""Slurm through `scontrol`: node and job state parsed from `-o` output, drain/resume and requeue.

Parsing is kept apart from running the command, so the parsers are tested on captured output
(Slurm 22.05, Debian 12) and the commands against a real slurmctld. Every command goes through
`trainwarden.commands.CommandRunner` with validated node names and job ids; nothing reaches a shell.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from trainwarden.commands import JOB_ID, NODE_NAME, CommandResult, CommandRunner, sanitize_reason
from trainwarden.errors import TrainwardenError
from trainwarden.model import ActionOutcome, ActionResult

REASON_PREFIX = "trainwarden:"
"""Every drain reason trainwarden sets starts with this; only such drains are ever undone."""

# `scontrol -o` prints `Key=value` pairs separated by spaces, but values may hold spaces too
# (`OS=Linux 6.1 #1 SMP`, `Reason=bad gpu [root@...]`). Slurm keys start with a capital letter and
# may hold `:` or `/` (`AllocNode:Sid`, `CPUs/Task`), so a key is only recognised there.
_KEY = re.compile(r"(?:^|\s)([A-Z][A-Za-z0-9_:/]*)=")
_REASON_STAMP = re.compile(r"\s*\[([^\]@\s]+)@([^\]\s]+)\]\s*$")

# Job states in which a requeue would do nothing useful: already waiting to run again.
_PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING"})
# A job its owner cancelled, or one that finished successfully, is never brought back.
_FINAL_BY_INTENT = frozenset({"CANCELLED", "COMPLETED", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})


class SlurmError(TrainwardenError):
    """`scontrol` failed or printed something we cannot read."""


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as a dict of its fields (values stripped)."""
    matches = list(_KEY.finditer(line))
    fields: dict[str, str] = {}
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
        fields[match.group(1)] = line[match.end() : end].strip()
    return fields


@dataclass(frozen=True)
class SlurmNode:
    """The parts of a node's state that drain decisions need."""

    name: str
    state: str
    flags: frozenset[str]
    reason: str = ""
    reason_user: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def drained(self) -> bool:
        """True when DRAIN is set (drained, or draining while jobs finish)."""
        return "DRAIN" in self.flags

    @property
    def drained_by_trainwarden(self) -> bool:
        """True when drained with a reason trainwarden wrote."""
        return self.drained and self.reason.startswith(REASON_PREFIX)


def node_from_fields(fields: Mapping[str, str]) -> SlurmNode:
    """Build a `SlurmNode` from parsed fields; raise `SlurmError` when NodeName or State is missing."""
    name = fields.get("NodeName", "")
    state = fields.get("State", "")
    if not name or not state:
        raise SlurmError(f"scontrol node record lacks NodeName or State: {dict(fields)!r:.200}")
    base, *flags = state.split("+")
    reason = fields.get("Reason", "")
    user = ""
    stamp = _REASON_STAMP.search(reason)
    if stamp:
        user = stamp.group(1)
        reason = reason[: stamp.start()]
    if reason == "(null)":
        reason = ""
    return SlurmNode(
        name, base.rstrip("*~#!%$@^-"), frozenset(flags), reason.strip(), user, MappingProxyType(dict(fields))
    )


def parse_nodes(text: str) -> list[SlurmNode]:
    """Every node in `scontrol show nodes -o` output (one line per node)."""
    return [node_from_fields(parse_record(line)) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class SlurmJob:
    """The parts of a job's state that a requeue decision needs."""

    job_id: str
    state: str
    requeue_allowed: bool
    restarts: int
    batch: bool
    fields: Mapping[str, str] = field(default_factory=dict)


def parse_job(text: str) -> SlurmJob:
    """The first job in `scontrol show job -o ID` output; raise `SlurmError` when unreadable."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SlurmError("scontrol printed no job record")
    fields = parse_record(lines[0])
    try:
        return SlurmJob(
            job_id=fields["JobId"],
            state=fields["JobState"],
            requeue_allowed=fields.get("Requeue", "1") == "1",
            restarts=int(fields.get("Restarts", "0")),
            batch=fields.get("BatchFlag", "1") == "1",
            fields=MappingProxyType(fields),
        )
    except (KeyError, ValueError) as exc:
        raise SlurmError(f"scontrol job record unreadable ({exc}): {lines[0][:200]!r}") from exc


def _check_node(name: str) -> str:
    if not NODE_NAME.match(name) or name.startswith("-"):
        raise SlurmError(f"node name {name[:80]!r} must match {NODE_NAME.pattern}")
    return name


def _check_job(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise SlurmError(f"job id {job_id[:80]!r} must match {JOB_ID.pattern}")
    return job_id


@dataclass
class Scontrol:
    """The `scontrol` calls trainwarden makes, each checked; `program` may be a full path."""

    runner: CommandRunner = field(default_factory=CommandRunner)
    program: str = "scontrol"
    timeout_seconds: float = 15.0

    def _run(self, *args: str) -> CommandResult:
        return self.runner.run([self.program, *args], self.timeout_seconds)

    def _require(self, result: CommandResult, what: str) -> str:
        if not result.ok:
            raise SlurmError(f"{what}: {result.summary()}")
        return result.stdout

    def node(self, name: str) -> SlurmNode | None:
        """State of one node, or None when Slurm does not know it."""
        result = self._run("show", "node", "-o", _check_node(name))
        if result.returncode == 1 and "not found" in (result.stdout + result.stderr):
            return None
        nodes = parse_nodes(self._require(result, f"scontrol show node {name}"))
        return next((n for n in nodes if n.name == name), None)

    def nodes(self) -> list[SlurmNode]:
        """State of every node in the cluster."""
        return parse_nodes(self._require(self._run("show", "nodes", "-o"), "scontrol show nodes"))

    def drain(self, name: str, reason: str) -> None:
        """Set DRAIN with a reason that always carries the trainwarden prefix (sanitised)."""
        text = sanitize_reason(f"{REASON_PREFIX} {reason.removeprefix(REASON_PREFIX)}")
        args = ("update", f"NodeName={_check_node(name)}", "State=DRAIN", f"Reason={text}")
        self._require(self._run(*args), f"scontrol update NodeName={name} State=DRAIN")

    def resume(self, name: str) -> None:
        """Set State=RESUME (undrain)."""
        args = ("update", f"NodeName={_check_node(name)}", "State=RESUME")
        self._require(self._run(*args), f"scontrol update NodeName={name} State=RESUME")

    def job(self, job_id: str) -> SlurmJob | None:
        """State of one job, or None when Slurm no longer knows it."""
        result = self._run("show", "job", "-o", _check_job(job_id))
        if result.returncode == 1 and "Invalid job id" in (result.stdout + result.stderr):
            return None
        return parse_job(self._require(result, f"scontrol show job {job_id}"))

    def requeue(self, job_id: str) -> None:
        """`scontrol requeue JOB` (unchecked; see `requeue_job`)."""
        self._require(self._run("requeue", _check_job(job_id)), f"scontrol requeue {job_id}")

    def start_now(self, job_id: str) -> None:
        """Clear a pending job's begin-time hold (`scontrol update JobId=J StartTime=now`)."""
        args = ("update", f"JobId={_check_job(job_id)}", "StartTime=now")
        self._require(self._run(*args), f"scontrol update JobId={job_id} StartTime=now")


def requeue_job(  # noqa: PLR0911 - one early return per job state keeps the decision readable
    scontrol: Scontrol,
    job_id: str,
    *,
    dry_run: bool,
    restarts_seen: int | None = None,
    start_now: bool = False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ActionResult:
    """Requeue a Slurm batch job so it restarts (and resumes from its checkpoint), checked both sides.

    Idempotent-ish: a job already pending is left alone, and with `restarts_seen` (the job's
    `Restarts` count when the fault was seen) a job Slurm has restarted since is not requeued
    again, so a daemon restarted mid-incident does not requeue twice. A job cancelled by its owner
    or one that completed is never brought back.

    Slurm holds a requeued job for about two minutes (`Reason=BeginTime`, measured on 22.05) before
    it may start again. `start_now` waits (bounded) for the job to be PENDING and clears that hold,
    which cuts the time to the first new step when the node is known to be clean.
    """
    try:
        job = scontrol.job(job_id)
        if job is None:
            return ActionResult(ActionOutcome.FAILED, f"slurm job {job_id} is unknown to slurmctld")
        data: dict[str, str | float | int | bool] = {
            "job_id": job_id,
            "state": job.state,
            "restarts": job.restarts,
        }
        if restarts_seen is not None and job.restarts > restarts_seen:
            detail = f"job {job_id} already restarted ({job.restarts} > {restarts_seen}); not requeued again"
            return ActionResult(ActionOutcome.NOOP, detail, data)
        if job.state in _PENDING_STATES:
            return ActionResult(ActionOutcome.NOOP, f"job {job_id} is already {job.state}", data)
        if job.state in _FINAL_BY_INTENT:
            why = f"job {job_id} is {job.state}; a cancelled or finished job is not requeued"
            return ActionResult(ActionOutcome.FAILED, why, {**data, "refused": "job_state"})
        if not job.batch or not job.requeue_allowed:
            why = f"job {job_id} cannot be requeued (batch={job.batch}, Requeue={int(job.requeue_allowed)})"
            return ActionResult(ActionOutcome.FAILED, why, {**data, "refused": "not_requeueable"})
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would requeue job {job_id} ({job.state})", data)
        scontrol.requeue(job_id)
        after = scontrol.job(job_id)
    except SlurmError as exc:
        return ActionResult(ActionOutcome.FAILED, str(exc), {"job_id": job_id})
    if after is None or after.restarts <= job.restarts:
        state = "gone" if after is None else after.state
        return ActionResult(ActionOutcome.FAILED, f"job {job_id} not requeued (now {state})", data)
    detail = f"requeued job {job_id}: {job.state} -> {after.state}, restarts {after.restarts}"
    if start_now:
        detail += "; " + _release_hold(scontrol, job_id, clock, sleep)
    return ActionResult(
        ActionOutcome.APPLIED, detail, {**data, "state": after.state, "restarts": after.restarts}
    )


def _release_hold(
    scontrol: Scontrol,
    job_id: str,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    timeout: float = 15.0,
) -> str:
    """Clear the begin-time hold once the requeued job is PENDING; say what happened."""
    deadline = clock() + timeout
    try:
        while clock() < deadline:
            job = scontrol.job(job_id)
            if job is None:
                return "job vanished before its hold could be cleared"
            if job.state != "PENDING":
                sleep(0.2)
                continue
            if job.fields.get("Reason") == "BeginTime":
                scontrol.start_now(job_id)
                return "begin-time hold cleared"
            return f"pending ({job.fields.get('Reason', '?')}), no hold to clear"
    except SlurmError as exc:
        return f"hold not cleared: {exc}"
    return f"hold not cleared: job not PENDING within {timeout:g} s"
