"""Checkpoint-restart: bring a job back through a restart backend, resuming from its newest valid checkpoint.

Three paths, picked by the rule behind the action:

- a healthy-but-bad job (spike, throughput drop, …): write a checkpoint request into the control
  file, wait (bounded) until every local rank reported a checkpoint newer than the request, then
  restart; on timeout restart anyway from the older checkpoint and say so;
- non-finite loss or grad norm: restart *without* a new checkpoint and write `skip_batches` around
  the first bad step (from the finding's evidence, whenever the action runs) into the control
  file, so the resumed job steps over the batch that produced it. Refused, with the reason, when
  the job's newest reported checkpoint is at or after that step: it may hold the bad state;
- a hung or vanished job (stall, collective_stuck, process_gone, process_exit): no request can be
  answered; capture every rank's stacks (`trainwarden.stacks`) and trigger NCCL's flight recorder
  where configured, then kill and restart. After a crash (process_gone, process_exit) no stacks are
  taken: the dead rank has none and its peers are killed at once, not waited for.

Backends (`backend = ...`): `supervise` (the `trainwarden run` child, lent by the daemon),
`torchrun`, `systemd` (`systemd_unit`), `slurm` (`slurm_job_id` or a job named `slurm-<id>`),
`command` (`command_argv`, placeholders `{job}` and `{reason}`)::

    [healers.checkpoint_restart]
    backend = "torchrun"
    checkpoint_timeout_seconds = 120
    skip_batches_after = 0            # nonfinite: skip [first bad step, first bad step + N]
    flight_recorder_pipe = "/tmp/nccl_trace_pipe_"   # the job's TORCH_NCCL_DEBUG_INFO_PIPE_FILE
    warm_start = false                # supervise: restart into pre-imported spares (docs/HEALING.md)

A restart takes effect when the job is back (a step of the new run), not when the restart returned:
until then, a late exit or finding of the replaced run is no evidence that the restart failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from trainwarden.backends.base import RankProcess, RestartBackend
from trainwarden.backends.comeback import last_step_at
from trainwarden.backends.warm_pool import DEFAULT_MODULES
from trainwarden.commands import CommandError, CommandTemplate
from trainwarden.config import PluginOptions
from trainwarden.control import ControlFileError, ControlState, control_path, read_control, write_control
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.model import Sample
from trainwarden.protocol import default_control_dir
from trainwarden.stacks import capture_stacks, trigger_flight_recorder

log = logging.getLogger(__name__)

LAST_CHECKPOINT_TS = "trainwarden_train_last_checkpoint_timestamp_seconds"
LAST_CHECKPOINT_STEP = "trainwarden_train_last_checkpoint_step"
# restart_unanswered: a restarted job that never stepped again is hung (in set-up), not checkpointable
HANG_RULES = ("stall", "collective_stuck", "process_gone", "process_exit", "restart_unanswered")
SKIP_RULES = ("nonfinite",)
CRASH_RULES = ("process_gone", "process_exit")  # restarted at once: no stacks of the waiting peers
STACKS_DIR = "stacks"
Backend = Literal["supervise", "torchrun", "systemd", "slurm", "command"]


@dataclass(frozen=True)
class CheckpointRestartOptions(PluginOptions):
    """How the job is restarted and what happens first."""

    backend: Backend = "supervise"
    control_dir: Path | None = None
    checkpoint_timeout_seconds: float = 120.0
    hang_rules: tuple[str, ...] = HANG_RULES
    skip_rules: tuple[str, ...] = SKIP_RULES
    skip_on_spike: bool = False  # PaLM-style: also skip the batches around a loss spike
    skip_batches_before: int = 0
    skip_batches_after: int = 0
    capture_stacks: bool = True
    stack_timeout_seconds: float = 5.0
    flight_recorder_pipe: str = ""
    systemd_unit: str = ""
    slurm_job_id: str = ""
    command_argv: tuple[str, ...] = ()
    kill_grace_seconds: float = 10.0
    # after a restart the job must be back (a step) within this bound (trainwarden.backends.comeback)
    restart_deadline_seconds: float = 0.0  # 0: factor x the job's observed start-up, at least the floor
    restart_deadline_floor_seconds: float = 120.0
    restart_deadline_factor: float = 3.0
    # supervise only (`trainwarden run`): start the restarted launcher and workers in warm spares
    warm_start: bool = False
    warm_spares: int = 0  # unclaimed spares kept; 0: one per local rank and one for the launcher
    warm_modules: tuple[str, ...] = DEFAULT_MODULES  # what each spare imports before it is claimed
    warm_nice: int = 19  # the spares' zygote's niceness (19: idle CPU only; 0: ready soonest)

    def problems(self) -> list[tuple[str, str]]:  # noqa: C901, PLR0912 - one check per key
        """Positive bounds; each backend's own setting present."""
        found = super().problems()
        for key in (
            "checkpoint_timeout_seconds",
            "stack_timeout_seconds",
            "kill_grace_seconds",
            "restart_deadline_floor_seconds",
            "restart_deadline_factor",
        ):
            if getattr(self, key) <= 0:
                found.append((key, "must be > 0"))
        if self.restart_deadline_seconds < 0:
            found.append(("restart_deadline_seconds", "must be >= 0 (0 derives it from start-up times)"))
        if self.warm_spares < 0:
            found.append(("warm_spares", "must be >= 0 (0: one per local rank, plus the launcher)"))
        if not 0 <= self.warm_nice <= 19:
            found.append(("warm_nice", "must be 0..19"))
        if self.warm_start and self.backend != "supervise":
            found.append(("warm_start", 'needs backend = "supervise" (the `trainwarden run` child)'))
        bad = [m for m in self.warm_modules if not all(part.isidentifier() for part in m.split("."))]
        if bad:
            found.append(("warm_modules", f"not module names: {bad}"))
        for key in ("skip_batches_before", "skip_batches_after"):
            if getattr(self, key) < 0:
                found.append((key, "must be >= 0"))
        if self.backend == "systemd" and not self.systemd_unit:
            found.append(("systemd_unit", 'required with backend = "systemd"'))
        if self.backend == "command":
            if not self.command_argv:
                found.append(("command_argv", 'required with backend = "command"'))
            else:
                try:
                    CommandTemplate(self.command_argv)
                except CommandError as exc:
                    found.append(("command_argv", str(exc)))
        return found


def running(pid: int) -> bool:
    """True for a live process; a crashed rank not yet reaped (a zombie) has no stack to capture.

    Trying one anyway cost a crash's restart the whole `stack_timeout_seconds` (py-spy fails on a
    zombie, then the faulthandler fallback waits for a dump that never comes).
    """
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def request_id(action_key: str) -> str:
    """A stable checkpoint request id for one action (the same action asks once)."""
    return "tw-" + hashlib.sha256(action_key.encode()).hexdigest()[:16]


class CheckpointRestartHealer(Healer):
    """Restarts the job named in the action's subject through the configured backend."""

    name = "checkpoint_restart"
    Options = CheckpointRestartOptions

    def __init__(self, options: PluginOptions, context: HealerContext) -> None:
        super().__init__(options, context)
        self._backend: RestartBackend | None = None

    @property
    def opts(self) -> CheckpointRestartOptions:
        """Typed options."""
        assert isinstance(self.options, CheckpointRestartOptions)
        return self.options

    def backend(self) -> RestartBackend | None:
        """The restart backend (built on first use); None when `supervise` runs without `trainwarden run`."""
        if self._backend is not None:
            return self._backend
        opts = self.opts
        if opts.backend == "supervise":
            self._backend = self.context.restart_backend
        elif opts.backend == "torchrun":
            from trainwarden.backends.torchrun import TorchrunBackend  # noqa: PLC0415 - only when used

            self._backend = TorchrunBackend(self._processes, opts.kill_grace_seconds)
        elif opts.backend == "systemd":
            from trainwarden.backends.systemd import SystemdBackend  # noqa: PLC0415

            self._backend = SystemdBackend(opts.systemd_unit)
        elif opts.backend == "slurm":
            from trainwarden.backends.slurm_requeue import SlurmRequeueBackend  # noqa: PLC0415

            self._backend = SlurmRequeueBackend(job_id=opts.slurm_job_id)
        else:
            from trainwarden.backends.command import CommandBackend  # noqa: PLC0415

            self._backend = CommandBackend(opts.command_argv)
        return self._backend

    def took_effect(self, action: Action, applied_at: float) -> float | None:
        """When the job was back after the restart (its first step record since it was applied).

        A restart has not worked the moment it was applied: the replaced run's last exits and
        findings arrive after it. Until the job is back, the supervise backend's restart is in
        effect once its new run ended on its own (a job that fails before its first step: that
        exit is the evidence), and None before (the policy bounds the wait by its cooldown);
        other backends, which cannot see their new run end, count from the moment applied.
        """
        job = action.subject.get("job", "")
        store = self.context.store
        if not job or store is None or self.context.jobs is None:
            return applied_at  # nothing to watch the job through: in effect once applied
        stepped = last_step_at(store, self.context.jobs, job)
        if stepped is not None and stepped > applied_at:
            return stepped
        if self.opts.backend != "supervise":
            return applied_at
        ended = getattr(self.backend(), "ended_at", None)
        if isinstance(ended, float):
            return max(ended, applied_at)
        return None

    def samples(self) -> list[Sample]:
        """The backend's metrics (commands run)."""
        backend = self._backend
        return backend.samples() if backend is not None else []

    def _processes(self, job: str) -> list[RankProcess]:
        jobs = self.context.jobs
        return list(jobs.processes(job)) if jobs is not None else []

    def control_file(self, job: str) -> Path:
        """The job's control file (same place the training collector and the clip healer use)."""
        directory = self.opts.control_dir or default_control_dir(self.context.runtime_dir)
        return control_path(directory, job)

    # --- apply ----------------------------------------------------------------------------------

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:  # noqa: C901, PLR0911 - one return per checked state
        """Checkpoint (or capture stacks, or mark batches to skip), then restart."""
        job = action.subject.get("job", "")
        rule = str(action.params.get("rule", ""))
        # a dry run that could not act has not failed: it tried nothing (and opens no breaker)
        cannot = ActionOutcome.DRY_RUN if dry_run else ActionOutcome.FAILED
        prefix = "would not restart: " if dry_run else ""
        if not job:
            return ActionResult(cannot, f"{prefix}the finding names no job to restart")
        backend = self.backend()
        if backend is None:
            why = 'backend "supervise" needs `trainwarden run` (no supervised child in this daemon)'
            return ActionResult(cannot, f"{prefix}{why}")
        stale = self._stale(action, backend, job)
        if stale:
            return ActionResult(ActionOutcome.NOOP, stale)
        mode = self._mode(rule)
        unsafe = self._unsafe_checkpoint(job, action) if mode == "skip" else ""
        if unsafe:
            return ActionResult(cannot, f"{prefix}{unsafe}", {"job": job, "mode": mode})
        if dry_run:
            return ActionResult(
                ActionOutcome.DRY_RUN, f"would {mode} and restart job {job} via {backend.name}"
            )
        data: dict[str, str | float | int | bool] = {"job": job, "mode": mode, "backend": backend.name}
        try:
            if mode == "checkpoint":
                data.update(self._checkpoint_first(job, action))
            elif mode == "skip":
                data.update(self._mark_skip(job, action))
            else:
                data.update(self._capture(job, action))
        except ControlFileError as exc:
            # never overwrite a control file we cannot read: it may hold requests of its own
            return ActionResult(ActionOutcome.FAILED, f"control file of job {job!r} unusable: {exc}", data)
        except OSError as exc:
            return ActionResult(ActionOutcome.FAILED, f"cannot prepare restart of job {job}: {exc}", data)
        known = [r.pid for r in self._processes(job) if r.pid > 0]  # before the restart forgets them
        result = backend.restart(job, action.reason, key=action.key)
        if result.outcome is ActionOutcome.APPLIED:
            backend.retire(known)  # a rank that died on its own is of the old run too (process_gone)
        if self.context.jobs is not None and result.outcome is ActionOutcome.APPLIED:
            # after the restart (the torchrun backend reads the ranks' pids), before the next rule tick
            self.context.jobs.forget(job)
        prefix = ", ".join(f"{k}={v}" for k, v in data.items() if k in {"checkpoint", "skip", "stacks"})
        detail = f"{result.detail} ({prefix})" if prefix else result.detail
        return ActionResult(result.outcome, detail, {**data, **result.data})

    def _mode(self, rule: str) -> str:
        opts = self.opts
        if rule in opts.hang_rules:
            return "capture stacks"
        if rule in opts.skip_rules or (rule == "spike" and opts.skip_on_spike):
            return "skip"
        return "checkpoint"

    def _stale(self, action: Action, backend: RestartBackend, job: str) -> str:
        """Why a vanished-process finding is about a run that was already restarted, or ''."""
        pid = action.evidence.get("pid")
        if action.params.get("rule") != "process_gone" or not isinstance(pid, float | int):
            return ""
        if backend.retired(int(pid)):
            return f"pid {int(pid)} belonged to an earlier run of job {job}; it was restarted already"
        return ""

    # --- the three ways in --------------------------------------------------------------------------

    def _read(self, job: str) -> tuple[Path, ControlState]:
        path = self.control_file(job)
        state = read_control(path) if path.exists() else ControlState(job=job)
        return path, state

    def _checkpoint_first(self, job: str, action: Action) -> dict[str, str | float | int | bool]:
        path, state = self._read(job)
        wanted = request_id(action.key)
        asked_at = self.context.clock()
        if state.checkpoint_request != wanted:
            write_control(
                path, dataclasses.replace(state, job=job, checkpoint_request=wanted, updated_at=asked_at)
            )
        ranks = self._processes(job)
        deadline = time.monotonic() + self.opts.checkpoint_timeout_seconds
        while time.monotonic() < deadline:
            if ranks and all(self._checkpointed_since(job, r.rank, asked_at) for r in ranks):
                return {
                    "checkpoint": "saved",
                    "checkpoint_wait_seconds": round(self.context.clock() - asked_at, 3),
                }
            time.sleep(0.1)
        log.warning(
            "checkpoint_restart: job %s saved no checkpoint within %.0fs",
            job,
            self.opts.checkpoint_timeout_seconds,
        )
        return {"checkpoint": "timeout"}

    def _checkpointed_since(self, job: str, rank: int, since: float) -> bool:
        store = self.context.store
        if store is None:
            return False
        stamp = store.value(LAST_CHECKPOINT_TS, job=job, rank=str(rank))
        return stamp is not None and stamp >= since

    def _unsafe_checkpoint(self, job: str, action: Action) -> str:
        """Why restarting would resume the job from a checkpoint taken at or after its first bad step, or ''.

        The daemon knows the step of each rank's last checkpoint record; a checkpoint saved at or
        after the first non-finite step may hold the bad state (a client that checks before saving
        never reports one, but that is not relied on). Resuming from it would repeat the fault and
        skip a good batch, so the restart is refused with the reason, and the policy alerts.
        """
        first = action.params.get("first_step", action.params.get("step"))
        store = self.context.store
        if not isinstance(first, float | int) or store is None:
            return ""
        saved = [
            series.value
            for series in store.find(LAST_CHECKPOINT_STEP)
            if dict(series.labels).get("job") == job and math.isfinite(series.value)
        ]
        if not saved or max(saved) < first:
            return ""
        return (
            f"will not restart job {job}: its newest checkpoint (step {max(saved):.0f}) is at or after "
            f"the first non-finite step {first:.0f} and may hold the bad state; resuming from it would "
            f"repeat the fault. Resume the job by hand from a checkpoint older than step {first:.0f}"
        )

    def _mark_skip(self, job: str, action: Action) -> dict[str, str | float | int | bool]:
        first = action.params.get("first_step", action.params.get("step"))
        if not isinstance(first, float | int):
            return {"skip": "none (the finding names no step)"}
        start = max(0, int(first) - self.opts.skip_batches_before)
        end = int(first) + self.opts.skip_batches_after
        path, state = self._read(job)
        if not state.should_skip(start) or not state.should_skip(end):
            ranges = (*state.skip_batches, (start, end))
            write_control(
                path,
                dataclasses.replace(state, job=job, skip_batches=ranges, updated_at=self.context.clock()),
            )
        return {"skip": f"{start}-{end}", "skip_first": start, "skip_last": end}

    def _capture(self, job: str, action: Action) -> dict[str, str | float | int | bool]:
        opts = self.opts
        ranks = [r for r in self._processes(job) if running(r.pid)]
        data: dict[str, str | float | int | bool] = {}
        if opts.flight_recorder_pipe:
            dumped = trigger_flight_recorder(opts.flight_recorder_pipe, [r.rank for r in ranks])
            data["flight_recorder"] = ", ".join(f"rank {k}: {v}" for k, v in sorted(dumped.items()))
        if action.params.get("rule") in CRASH_RULES and opts.capture_stacks:
            # A crash: the dead rank has no stack, and its peers only wait for it (or are already
            # tearing down, where py-spy fails and the fallback waits the whole stack timeout).
            # Killing them promptly is worth more than their stacks.
            data["stacks"] = "skipped (a crash: the peers are not waited for)"
            return data
        if not opts.capture_stacks or not ranks:
            data["stacks"] = "none" if opts.capture_stacks else "disabled"
            return data
        captures = capture_stacks(ranks, timeout=opts.stack_timeout_seconds)
        folder = (
            self.context.state_dir
            / STACKS_DIR
            / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{request_id(action.key)}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        for capture in captures:
            (folder / f"rank{capture.rank}.txt").write_text(capture.render(), encoding="utf-8")
            data[f"stacks_rank{capture.rank}"] = capture.method
        data["stacks"] = f"{sum(c.method != 'none' for c in captures)}/{len(captures)} ranks"
        data["stacks_dir"] = str(folder)
        return data


HEALER = CheckpointRestartHealer
