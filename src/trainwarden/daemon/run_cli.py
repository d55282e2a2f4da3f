"""`trainwarden run -- CMD ARGS…`: the daemon in-process, supervising CMD as its own child process group.

The embedded default on one node. The daemon (collectors, rules, policy, healers, HTTP) runs in
this process; CMD runs through the `supervise` backend with `TRAINWARDEN_SOCKET`,
`TRAINWARDEN_CONTROL_DIR`, `TRAINWARDEN_JOB` and `TRAINWARDEN_RESTART_COUNT` in its environment so
the training client finds the daemon. A hang or a bad job is healed by the policy as on any node; a
child that exits non-zero is itself a `process_exit` finding, handed to the policy at once. The
policy's cooldowns, budgets and ladders apply as everywhere: when it refuses for good (budget
spent, ladder exhausted, observe-only mode) the run exits with the job's last status.

    trainwarden run --config demo.toml -- torchrun --nproc-per-node 2 train.py --ckpt-dir ckpt

With `[healers.checkpoint_restart] warm_start = true` the run keeps a pool of pre-imported spares
(`trainwarden.backends.warm_pool`) that each restarted launcher and worker starts in, so a restart
does not pay Python's and torch's start-up again (docs/HEALING.md).

Python callers (the demo) use `run_job(config, command, on_event=...)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import psutil

from trainwarden.backends.base import RankProcess
from trainwarden.backends.comeback import last_step_at
from trainwarden.backends.restart_stages import RestartStages
from trainwarden.backends.supervise import Supervisor
from trainwarden.backends.warm_pool import WarmPool
from trainwarden.collectors.training import TrainingCollector, TrainingOptions
from trainwarden.config import Config
from trainwarden.daemon.app import Daemon
from trainwarden.daemon.healing import Healing, finding_event
from trainwarden.daemon.rank_exits import RankExits
from trainwarden.daemon.timeline import EventKind, EventSink, TimelineEvent, emit
from trainwarden.healers.checkpoint_restart import CheckpointRestartOptions
from trainwarden.healers.policy import Outcome, observed_at
from trainwarden.journal import Decision
from trainwarden.model import Finding, Severity
from trainwarden.protocol import (
    CONTROL_DIR_ENV,
    EXIT_CHECKPOINTED,
    JOB_ENV,
    SOCKET_ENV,
    Hello,
    Record,
    StartupRecord,
    StepRecord,
    default_control_dir,
    default_socket_path,
    safe_job_name,
)

log = logging.getLogger(__name__)

EXIT_RULE = "process_exit"
POLL_SECONDS = 0.5
DRAIN_SECONDS = 2.0
_FINAL = frozenset({"budget", "circuit_open", "healer_disabled", "no_route", "failed", "dry_run"})
STAGES_FILE = "restart_stages.jsonl"
CRASH_WAIT_SECONDS = 60.0  # a crash decision's stacks, kill and start; longer, and the exit is decided on


def job_env(config: Config, job: str) -> dict[str, str]:
    """What the child needs to find this daemon: socket, control dir, job name."""
    options = config.plugins.get("collectors", {}).get("training")
    training = options if isinstance(options, TrainingOptions) else TrainingOptions()
    runtime = config.daemon.runtime_dir
    socket_path = Path(training.socket_path) if training.socket_path else default_socket_path(runtime)
    control = Path(training.control_dir) if training.control_dir else default_control_dir(runtime)
    return {SOCKET_ENV: str(socket_path), CONTROL_DIR_ENV: str(control), JOB_ENV: job}


def _writable(path: Path) -> bool:
    """True when `path` exists writable, or could be created under its nearest existing parent."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def private_dirs(config: Config) -> Config:
    """The config, with per-user directories where the configured ones are not writable.

    `trainwarden run` is often started by a researcher, not root: `/run/trainwarden` and
    `/var/lib/trainwarden` are then out of reach, so the run falls back to a fresh runtime dir
    under the temp dir and a state dir under `~/.local/state/trainwarden` (the journal persists).
    """
    daemon = config.daemon
    runtime, state = daemon.runtime_dir, daemon.state_dir
    if not _writable(runtime):
        runtime = Path(tempfile.mkdtemp(prefix="trainwarden-run-"))
        log.info("runtime_dir %s not writable; using %s", daemon.runtime_dir, runtime)
    if not _writable(state):
        state = Path.home() / ".local" / "state" / "trainwarden"
        log.info("state_dir %s not writable; using %s", daemon.state_dir, state)
    return dataclasses.replace(
        config, daemon=dataclasses.replace(daemon, runtime_dir=runtime, state_dir=state)
    )


def exit_finding(job: str, code: int, now: float) -> Finding:
    """A child's non-zero exit as a finding: planned (75, checkpointed) or transient."""
    planned = code == EXIT_CHECKPOINTED
    why = "checkpointed and asked to be resumed" if planned else "crashed"
    return Finding(
        EXIT_RULE,
        {"job": job},
        Severity.WARNING if planned else Severity.CRITICAL,
        f"job {job} exited with status {code} ({why})",
        since=now,
        evidence={"exit_code": code, "interruption": "planned" if planned else "transient"},
        source="supervisor",
    )


def process_started_at(pid: int) -> float | None:
    """When `pid` was created, on the wall clock, to the kernel's tick (10 ms); None when it is gone.

    psutil's `create_time` adds the tick count since boot to the boot time, which /proc/stat gives
    in whole seconds: up to a second off the wall clock. The time since the process started
    (CLOCK_BOOTTIME now minus its start in ticks since boot) has no such error.
    """
    try:
        since_boot = psutil.Process(pid).create_time() - psutil.boot_time()  # the ticks, exactly
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


class _Run:
    """One supervised run: the child, the daemon around it and the exit-handling loop."""

    def __init__(self, config: Config, command: Sequence[str], job: str, on_event: EventSink | None) -> None:
        self.job = job
        self.on_event = on_event
        self.config = config
        self.daemon = Daemon(config)
        env = {**os.environ, **job_env(config, job)}
        self.stages = RestartStages(config.daemon.state_dir / STAGES_FILE)
        self._paths = config.paths.host_paths()
        self._ours: dict[int, float] = {}  # pid -> when its hello came, for the child's ranks only
        self.warm = warm_pool(config, env)
        self.supervisor = Supervisor(
            command,
            job=job,
            env=env,
            on_event=on_event,
            clock=self.daemon.clock,
            ranks=self._ranks,
            forget=self._forget,
            paths=self._paths,
            stages=self.stages,
            warm=self.warm,
        )
        self.healing = Healing(self.daemon, restart_backend=self.supervisor, on_event=on_event)
        self.daemon.healing = self.healing
        self.exits = RankExits(
            ranks=self._ranks,
            decide=self.healing.decide,
            store=self.daemon.store,
            clock=self.daemon.clock,
            accept=self._descends,
            ignore=lambda pid: self.stopping.is_set() or self.supervisor.retired(pid),
            on_crash=self._crashed,
        )
        self.daemon.record_listeners += [self._on_record, self.exits.on_record]
        self.healing.outcome_listeners.append(self._on_outcome)
        self.daemon.status_sections["restart_stages"] = self.stages.status
        self.stopping = threading.Event()
        self.stop_requested_at: float | None = None

    def _training(self) -> TrainingCollector | None:
        collectors = self.daemon._runtime.collectors  # noqa: SLF001 - its own daemon, looked up per call (reload)
        return next((c for c in collectors if isinstance(c, TrainingCollector)), None)

    def _ranks(self) -> list[RankProcess]:
        training = self._training()
        return [] if training is None else training.processes(None)

    def _forget(self, job: str) -> None:
        training = self._training()
        if training is not None:
            training.forget(job)

    # --- the restart, stage by stage --------------------------------------------------------------

    def _descends(self, pid: int) -> bool:
        return self.supervisor.owns(pid)

    def _on_record(self, now: float, job: str, rank: int, pid: int, record: Record) -> None:
        """Marks of the open restart from the child's ranks (the collector's lock is held: no calls back)."""
        del job, rank
        if isinstance(record, Hello):
            if not self._descends(pid):
                return
            self._ours[pid] = now
            created = self.supervisor.rank_started_at(pid, process_started_at(pid))
            if created is not None and created >= self.supervisor.started_at:
                self.stages.mark(self.job, "process_started", created)
            if self.supervisor.warm_rank(pid):
                self.stages.count(self.job, "warm_ranks")
        elif pid not in self._ours or self.supervisor.retired(pid):
            return
        elif isinstance(record, StartupRecord):
            self.stages.mark(self.job, record.stage, record.at)
        elif isinstance(record, StepRecord):
            self.stages.step(self.job, record.step, now)
            self.supervisor.stepped()

    def _crashed(self, finding: Finding) -> None:
        """A rank died: the fault's time for the restart that answers it, and a timeline event."""
        self.stages.fault(self.job, finding.since, finding.rule)
        emit(self.on_event, finding_event(EventKind.FINDING_FIRED, finding))

    def _on_outcome(self, outcome: Outcome, now: float) -> None:
        if outcome.healer == "checkpoint_restart" and outcome.result == "applied":
            finding = outcome.finding
            self.stages.decided(self.job, now, finding.rule, observed_at(finding))

    def run(self) -> int:
        self.daemon.start()
        try:
            self.supervisor.start()
            while True:
                code = self.supervisor.wait(POLL_SECONDS)
                if code is None:
                    # learn the names the child's ranks gave themselves while their pids exist
                    self.supervisor.supervised_jobs()
                    self._learn_startup()
                    self.supervisor.tick()
                    continue
                self._event(
                    EventKind.CHILD_EXITED, f"job {self.job} exited with status {code}", exit_code=code
                )
                if code == 0 or self.stopping.is_set():
                    return self._stopped_status(code) if self.stopping.is_set() else code
                if not self._heal_exit(code):
                    return code
        finally:
            self.exits.stop()
            self.supervisor.stop()
            self.daemon.stop()

    def _heal_exit(self, code: int) -> bool:
        """Let the policy restart the exited job; False when it will not (the run ends)."""
        generation = self.supervisor.generation
        if self._restarted_for_crash(generation):
            return True  # a rank's crash, seen first, restarted it: the launcher's exit is that fault
        finding = exit_finding(self._reported_job(), code, self.daemon.clock())
        self.stages.fault(self.job, finding.since, finding.rule)
        # A cooldown refusal means "not yet": wait it out (bounded), then the policy decides again.
        deadline = time.monotonic() + self.config.policy.cooldown_seconds + 10.0
        while not self.stopping.is_set():
            outcomes = self.healing.decide([finding])
            if self.supervisor.generation != generation:
                return True  # restarted (by this decision, or by the scheduler's tick meanwhile)
            outcome = outcomes[0] if outcomes else None
            if outcome is not None:
                if outcome.decision == Decision.GAVE_UP or outcome.result in _FINAL:
                    self._event(
                        EventKind.GAVE_UP,
                        f"not restarting job {self.job}: {outcome.result}: {outcome.detail}",
                        exit_code=code,
                    )
                    return False
                if outcome.decision == Decision.TAKEN:
                    return self.supervisor.running()
            if time.monotonic() > deadline:
                self._event(
                    EventKind.GAVE_UP, f"policy did not restart job {self.job} in time", exit_code=code
                )
                return False
            self.stopping.wait(1.0)
        return False

    def _restarted_for_crash(self, generation: int) -> bool:
        """Whether a rank's crash being decided on now restarts the child that exited (bounded wait).

        A launcher exits once a rank died (torchrun after its monitor interval); the exit watcher
        usually saw the rank first and its decision (stacks, kill, start) may still be running.
        """
        deadline = time.monotonic() + CRASH_WAIT_SECONDS
        time.sleep(0.05)  # the rank's exit reaches the watcher within this (it precedes the launcher's)
        while self.exits.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.supervisor.generation != generation

    def _learn_startup(self) -> None:
        """The child's first start-up (start to first step) sets the bound a restart must be back in."""
        job = self._reported_job()
        watch = self.healing.restarts
        if watch.knows_startup(job):
            return
        stepped = last_step_at(self.daemon.store, self.healing.context.jobs, job)
        if stepped is not None and stepped >= self.supervisor.started_at:
            watch.observe_startup(job, stepped - self.supervisor.started_at)

    def _reported_job(self) -> str:
        """The name the child's ranks report (`Reporter.from_env(job=...)`) when it is one, else the run's.

        Findings, the journal and the restart check then speak of the job its ranks report steps as.
        """
        aliases = self.supervisor.supervised_jobs() - {self.job}
        return next(iter(aliases)) if len(aliases) == 1 else self.job

    def _stopped_status(self, code: int) -> int:
        """75 when every rank checkpointed after the stop and said goodbye, whatever the launcher says.

        torchrun answers a SIGTERM with a status of its own (1) even when each worker saved its
        step and exited 75; what the workers did is what the caller (Slurm, a script) must see.
        """
        since = self.stop_requested_at
        if code in {0, EXIT_CHECKPOINTED} or since is None:
            return code
        names = self.supervisor.supervised_jobs()
        deadline = time.monotonic() + DRAIN_SECONDS  # the collector may still be reading their last records
        ranks = [r for r in self._ranks() if r.job in names]
        while any(r.connected for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
            ranks = [r for r in self._ranks() if r.job in names]
        clean = [
            r for r in ranks if r.exited_cleanly and r.checkpoint_at is not None and r.checkpoint_at >= since
        ]
        if not ranks or len(clean) != len(ranks):
            return code
        self._event(
            EventKind.CHILD_EXITED,
            f"job {self.job}: launcher exited {code}, but all {len(ranks)} rank(s) checkpointed after the "
            f"stop and exited cleanly; exiting {EXIT_CHECKPOINTED}",
            exit_code=EXIT_CHECKPOINTED,
            launcher_exit_code=code,
        )
        return EXIT_CHECKPOINTED

    def _event(self, kind: EventKind, summary: str, **data: int) -> None:
        emit(self.on_event, TimelineEvent(kind, summary, job=self.job, data=dict(data)))

    def request_stop(self) -> None:
        """Forward SIGTERM to the job (it checkpoints and exits) and end the run when it exits."""
        if self.stop_requested_at is None:
            self.stop_requested_at = self.daemon.clock()
        self.stopping.set()
        for pid in self.supervisor.pids(self.job) or ():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)


def warm_pool(config: Config, env: dict[str, str]) -> WarmPool | None:
    """The pool of warm spares when `[healers.checkpoint_restart] warm_start` is on, else None."""
    options = config.plugins.get("healers", {}).get("checkpoint_restart")
    if not isinstance(options, CheckpointRestartOptions) or not options.warm_start:
        return None
    directory = config.daemon.runtime_dir / f"warm-{os.getpid()}"
    return WarmPool(
        directory, size=options.warm_spares, modules=options.warm_modules, env=env, nice=options.warm_nice
    )


def run_job(
    config: Config,
    command: Sequence[str],
    *,
    on_event: EventSink | None = None,
    job: str | None = None,
    handle_signals: bool = False,
) -> int:
    """Supervise `command` under the daemon until it finishes or the policy gives up; its exit status.

    `job` defaults to `$TRAINWARDEN_JOB`, else the program's name. With `handle_signals` (the CLI),
    SIGTERM/SIGINT are forwarded to the job as SIGTERM and end the run once it exits.
    """
    name = safe_job_name(job or os.environ.get(JOB_ENV, "") or Path(command[0]).name)
    run = _Run(config, command, name, on_event)
    if handle_signals:

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s: stopping job %s", signal.Signals(signum).name, name)
            run.request_stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _on_signal)
    return run.run()
