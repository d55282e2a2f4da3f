"""The `supervise` backend: the daemon's own child, started as a process group of its own.

`trainwarden run -- CMD…` starts CMD through this class; a restart kills the child's whole
process tree and starts CMD again with `TRAINWARDEN_RESTART_COUNT` raised by one, so the job
knows it was restarted (and resumes from its newest valid checkpoint). The tree, not only the
process group, is killed: torchrun starts each worker in a session of its own.

The supervised job is every job whose ranks descend from the child, whatever name each rank gives
itself (`Reporter.from_env(job="mine")` under `trainwarden run` without `--job`): the daemon
knows each rank's pid from SO_PEERCRED, and `trainwarden.backends.lineage` walks its parents.

With warm start (`warm_pool`), the launcher and workers of each new start run in pre-imported
spares, children of the run rather than of the child: a claimed spare and its descendants count as
the child's (`owns`), and a restart kills them with the tree.

SIGKILL, not SIGTERM: by the time a restart is asked for, the healer has already taken the
checkpoint it wanted (or the job is hung and cannot answer), and a SIGTERM would make the job's
planned-interrupt handler race the restart with a checkpoint of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from trainwarden.backends.base import RankProcess, RestartBackend
from trainwarden.backends.lineage import descends_from, kill_tree, tree_pids
from trainwarden.backends.restart_stages import RestartStages
from trainwarden.backends.warm_pool import WarmPool
from trainwarden.errors import TrainwardenError
from trainwarden.model import ActionOutcome, ActionResult, Sample
from trainwarden.paths import HostPaths
from trainwarden.timeline import EventKind, EventSink, TimelineEvent, emit

log = logging.getLogger(__name__)

RESTART_COUNT_ENV = "TRAINWARDEN_RESTART_COUNT"
AUTO_SPARES = 3  # a launcher and two workers, until the job's local ranks are known


def exit_status(returncode: int) -> int:
    """A shell-style status: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor(RestartBackend):
    """Runs one command as a child process group; restart kills the tree and starts it again."""

    name = "supervise"

    def __init__(
        self,
        command: Sequence[str],
        *,
        job: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        kill_grace_seconds: float = 10.0,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.time,
        ranks: Callable[[], Sequence[RankProcess]] | None = None,
        forget: Callable[[str], None] | None = None,
        paths: HostPaths | None = None,
        stages: RestartStages | None = None,
        warm: WarmPool | None = None,
    ) -> None:
        """`ranks`: every rank the daemon knows (any job); `forget`: drop a job's ranks after a restart.

        `stages` is told when each restart's kill begins and ends and when the command started again;
        `warm`: the pool of spares the command's processes start in (warm start), None for cold starts.
        """
        super().__init__()
        if not command:
            raise TrainwardenError("supervise: no command given")
        self.command = tuple(command)
        self.job = job
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.kill_grace_seconds = kill_grace_seconds
        self.on_event = on_event
        self.clock = clock
        self.generation = 0
        self.started_at = 0.0
        self.ended_at: float | None = None  # when the current child exited on its own (None: it runs)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None  # readable the moment the current child exits (no polling)
        self.stages = stages
        self._state = threading.Lock()  # guards _proc/generation against a concurrent restart
        self._stopped = False
        self._ranks = ranks
        self._forget = forget
        self._paths = paths or HostPaths()
        self._aliases: set[str] = set()  # names the current child's ranks gave themselves
        self.warm = warm
        self._stepped = False  # the current child's job stepped: the pool may refill now
        self._auto_spares = warm is not None and warm.size <= 0
        if warm is not None and self._auto_spares:
            warm.size = AUTO_SPARES

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the command (the first time, or again after it exited)."""
        with self._state:
            if self.warm is not None and self.generation == 0:
                self.warm.start()
            self._spawn()

    def _spawn(self) -> None:
        env = {**self.env, RESTART_COUNT_ENV: str(self.generation)}
        if self.warm is not None:
            env = self.warm.child_env(env)
        try:
            proc = subprocess.Popen(  # the operator's own argument list, no shell
                self.command, env=env, cwd=self.cwd, stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            raise TrainwardenError(f"cannot start {self.command[0]!r}: {exc.strerror or exc}") from exc
        self._proc = proc
        self._set_pidfd(proc.pid)
        self.ended_at = None
        self.started_at = self.clock()
        if self.stages is not None:
            self.stages.mark(self.job, "spawned", self.started_at)
        self.generation += 1
        summary = f"started {' '.join(self.command)[:120]} (pid {proc.pid}, restart {self.generation - 1})"
        log.info("supervise: %s", summary)
        emit(
            self.on_event,
            TimelineEvent(
                EventKind.CHILD_STARTED,
                summary,
                job=self.job,
                data={"pid": proc.pid, "restart_count": self.generation - 1},
            ),
        )
        self._stepped = False

    def stepped(self) -> None:
        """The current child's job reported a step (it is back): spares may be started again."""
        self._stepped = True

    def tick(self) -> None:
        """Keep the warm pool full (one spare per local rank and the launcher); cheap, call it often.

        Only once the current start stepped: spares importing beside a start would slow it down.
        """
        warm = self.warm
        if warm is None or self._stopped or not self._stepped:
            return
        if self._auto_spares:
            local = len(self.descendant_ranks())
            warm.size = max(warm.size, local + 1)
        warm.fill()

    def _set_pidfd(self, pid: int) -> None:
        """Hold a pidfd of the new child (closing the old one's); None where pidfds are missing."""
        old, self._pidfd = self._pidfd, None
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            with contextlib.suppress(OSError):
                self._pidfd = pidfd_open(pid)

    def wait(self, timeout: float) -> int | None:
        """The current child's exit status once it exited on its own; None while it runs or was replaced.

        Blocks on the child's pidfd, so an exit wakes it at once (Popen.wait polls every 50 ms).
        """
        with self._state:
            proc, generation, pidfd = self._proc, self.generation, self._pidfd
        if proc is None:
            return None
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            with contextlib.suppress(OSError):  # closed by a restart meanwhile: answer from poll()
                poller.poll(max(0, int(timeout * 1000)))
            code = proc.poll()
            if code is None:
                return None
        else:
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        with self._state:
            if generation != self.generation or self._stopped:
                return None  # a restart (or stop) killed it: not the job's own exit
            if self.ended_at is None:
                self.ended_at = self.clock()
        return exit_status(code)

    def stop(self) -> None:
        """Kill the child's tree (the run is over or being aborted)."""
        with self._state:
            self._stopped = True
            if self._proc is not None and self._proc.poll() is None:
                kill_tree(self._proc.pid, self.kill_grace_seconds)
                self._proc.wait(self.kill_grace_seconds)
            if self.warm is not None:
                self.warm.stop(self.kill_grace_seconds)
            if self._pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._pidfd)
                self._pidfd = None

    @property
    def pid(self) -> int | None:
        """Pid of the current child."""
        proc = self._proc
        return None if proc is None else proc.pid

    def running(self) -> bool:
        """True while the current child has not exited."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def pids(self, job: str) -> set[int] | None:
        """The current child and every descendant (with the claimed warm spares and theirs)."""
        del job
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return set()
        out = set(tree_pids(proc.pid))
        for spare in self.warm.claimed() if self.warm is not None else ():
            out.update(tree_pids(spare))
        return out

    def owns(self, pid: int) -> bool:
        """True when `pid` is the current child, descends from it, or runs in a spare it claimed."""
        proc = self._proc
        if proc is None:
            return False
        if descends_from(pid, proc.pid, self._paths):
            return True
        return self.warm is not None and self.warm.owns(pid)

    def warm_rank(self, pid: int) -> bool:
        """True when rank `pid` started in a warm spare."""
        return self.warm is not None and self.warm.claimed_at(pid) is not None

    def rank_started_at(self, pid: int, created: float | None) -> float | None:
        """When rank `pid`'s start began: its spare's claim for a warm rank, else `created` (its process)."""
        claimed = None if self.warm is None else self.warm.claimed_at(pid)
        return created if claimed is None else claimed

    # --- which jobs are ours ------------------------------------------------------------------

    def descendant_ranks(self) -> list[RankProcess]:
        """The known ranks (of any job name) whose process descends from the current child."""
        proc = self._proc
        if proc is None or self._ranks is None:
            return []
        return [r for r in self._ranks() if self.owns(r.pid)]

    def supervised_jobs(self) -> set[str]:
        """The configured job name and every name the child's ranks gave themselves (seen so far)."""
        self._aliases.update(r.job for r in self.descendant_ranks())
        return {self.job, *self._aliases}

    def _not_ours(self, job: str) -> str:
        """Why `job` is not this child's job, or "" when it is."""
        if job in self.supervised_jobs():
            return ""
        pids = sorted(r.pid for r in self._ranks() if r.job == job) if self._ranks is not None else []
        where = f"pid(s) {pids}" if pids else "no known rank"
        return (
            f"job {job!r} is not the supervised job {self.job!r}: {where} of it, none descending "
            f"from the supervised pid {self.pid}"
        )

    # --- RestartBackend ---------------------------------------------------------------------

    def _restart(self, job: str, reason: str, *, dry_run: bool) -> ActionResult:
        why = self._not_ours(job)
        if why:
            return ActionResult(ActionOutcome.FAILED, why)
        with self._state:
            if self._stopped:
                return ActionResult(ActionOutcome.FAILED, "supervise: the run is stopping; not restarting")
            proc = self._proc
            alive = proc is not None and proc.poll() is None
            what = f"kill pid {proc.pid} and its tree, then start again" if alive and proc else "start again"
            if dry_run:
                return ActionResult(ActionOutcome.DRY_RUN, f"would {what} ({reason})")
            killed = self._kill(proc, alive=alive)
            if isinstance(killed, ActionResult):
                return killed
            aliases, self._aliases = self._aliases, set()
            if self._forget is not None:
                # the ranks of the killed tree vanished on purpose, under whatever name they used
                for name in sorted(aliases | {self.job}):
                    self._forget(name)
            try:
                self._spawn()
            except TrainwardenError as exc:
                return ActionResult(ActionOutcome.FAILED, str(exc))
            assert self._proc is not None
            detail = f"restarted job {job}: killed {len(killed)} process(es), new pid {self._proc.pid}"
            return ActionResult(
                ActionOutcome.APPLIED,
                detail,
                {"killed": len(killed), "pid": self._proc.pid, "restart_count": self.generation - 1},
            )

    def _kill(self, proc: subprocess.Popen[bytes] | None, *, alive: bool) -> list[int] | ActionResult:
        """Kill the current tree (state lock held); the pids killed, or the failure."""
        if self.stages is not None:
            self.stages.restart_began(self.job, self.clock())
        killed: list[int] = []
        if proc is not None:
            spares = self.warm.claimed() if self.warm is not None else []
            if alive:
                self.retire(tree_pids(proc.pid))  # first: their exits, seen at once, are no crash
            for spare in spares:
                self.retire(tree_pids(spare))
            if alive:
                killed = kill_tree(proc.pid, self.kill_grace_seconds)
            if self.warm is not None:
                killed += self.warm.kill_claimed(self.kill_grace_seconds)
            self.retire(killed)
            try:
                proc.wait(self.kill_grace_seconds)
            except subprocess.TimeoutExpired:
                return ActionResult(ActionOutcome.FAILED, f"pid {proc.pid} survived SIGKILL")
        if self.stages is not None:
            self.stages.mark(self.job, "killed", self.clock())
        return killed

    def samples(self) -> list[Sample]:
        """The stage-by-stage gauges of the last measured restart."""
        return [] if self.stages is None else self.stages.samples()
