"""The `torchrun` backend: kill this node's workers of the job; torchrun's elastic agent restarts them.

torchrun (`torch.distributed.run`) watches its workers; when one dies it tears the local group
down and, with restarts left (`--max-restarts`), rendezvouses again, so every node's agent
restarts its workers and the job resumes from its checkpoint. The daemon therefore only kills the
local worker processes it knows from their hello records, after checking that each one really is
a child of a torchrun agent (a worker without an agent would just die).

The agents found are remembered per job: when a restart is checked and the job is not back (its
new workers hang in set-up, maybe before any hello), the next restart kills the workers those
agents run now, instead of finding "nothing to kill". With no restarts left the agent then ends the
job; the restart check reports it either way.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Sequence

import psutil

from trainwarden.backends.base import RankProcess, RestartBackend
from trainwarden.model import ActionOutcome, ActionResult

_AGENT_MARKERS = ("torch.distributed.run", "torchrun", "torch.distributed.launch")


def agent_of(pid: int) -> int | None:
    """Pid of the torchrun agent `pid` descends from, or None."""
    try:
        for parent in psutil.Process(pid).parents():
            cmdline = " ".join(parent.cmdline())
            if any(marker in cmdline for marker in _AGENT_MARKERS):
                return parent.pid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return None


class TorchrunBackend(RestartBackend):
    """Kills the job's local workers (SIGKILL) so the elastic agent restarts the whole group."""

    name = "torchrun"

    def __init__(
        self, processes: Callable[[str], Sequence[RankProcess]], grace_seconds: float = 10.0
    ) -> None:
        super().__init__()
        self._processes = processes
        self.grace_seconds = grace_seconds
        self._agents: dict[str, set[int]] = {}  # job -> agent pids seen at its last restart

    def _restart(self, job: str, reason: str, *, dry_run: bool) -> ActionResult:
        ranks = [r.pid for r in self._processes(job) if r.pid > 0 and psutil.pid_exists(r.pid)]
        if not ranks:
            ranks = self._current_workers(job)
        if not ranks:
            return ActionResult(ActionOutcome.NOOP, f"no live local worker of job {job}; nothing to kill")
        agents = {pid: agent_of(pid) for pid in ranks}
        orphans = sorted(pid for pid, agent in agents.items() if agent is None)
        if orphans:
            why = f"worker pid(s) {orphans} of job {job} have no torchrun agent; killing would not restart"
            return ActionResult(ActionOutcome.FAILED, why, {"refused": "no_agent"})
        pids = sorted(agents)
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would kill workers {pids} of job {job} ({reason})")
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGKILL)
                procs.append(proc)
        self.retire(pids)
        _gone, alive = psutil.wait_procs(procs, timeout=self.grace_seconds)
        if alive:
            return ActionResult(ActionOutcome.FAILED, f"worker(s) {[p.pid for p in alive]} survived SIGKILL")
        agent_pids = sorted({a for a in agents.values() if a is not None})
        self._agents[job] = set(agent_pids)
        detail = f"killed {len(pids)} local worker(s) of job {job}; agent(s) {agent_pids} restart them"
        return ActionResult(ActionOutcome.APPLIED, detail, {"killed": len(pids)})

    def _current_workers(self, job: str) -> list[int]:
        """Workers the job's remembered agents run now (they may not have said hello yet)."""
        workers: list[int] = []
        for agent in sorted(self._agents.get(job, ())):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                workers.extend(c.pid for c in psutil.Process(agent).children())
        return workers
