"""What a restart backend is: one way to bring a whole training job back after it was stopped.

The checkpoint-restart healer decides *when* (after a checkpoint, or after capturing a hung job's
stacks); a backend only knows *how*: its own child process group (`supervise`), the local workers
that torchrun's elastic agent restarts (`torchrun`), a systemd unit, a Slurm requeue, or an
operator's command. `restart` is idempotent per action key, so a retried action restarts once.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterable
from typing import ClassVar

from trainwarden.model import ActionOutcome, ActionResult, JobView, RankProcess, Sample

# `RankProcess` and `JobView` live in the shared model (the training collector, below the backends,
# builds them); they are re-exported here, where backends and healers have always imported them from.
__all__ = ["MAX_RETIRED", "JobView", "RankProcess", "RestartBackend"]

MAX_RETIRED = 4096


class RestartBackend(abc.ABC):
    """Restarts a job; subclasses implement `_restart` and may override `pids`."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._done: dict[str, ActionResult] = {}
        self._lock = threading.Lock()
        self.restarts = 0
        self._retired: dict[int, None] = {}  # insertion-ordered set of pids killed for a restart

    def restart(self, job: str, reason: str, *, key: str, dry_run: bool = False) -> ActionResult:
        """Restart `job` once per `key`; a repeated key answers NOOP with the first result's detail."""
        with self._lock:
            done = self._done.get(key)
            if done is not None:
                return ActionResult(ActionOutcome.NOOP, f"already restarted for {key}: {done.detail}")
            result = self._restart(job, reason, dry_run=dry_run)
            if result.outcome is ActionOutcome.APPLIED:
                self._done[key] = result
                self.restarts += 1
            return result

    @abc.abstractmethod
    def _restart(self, job: str, reason: str, *, dry_run: bool) -> ActionResult:
        """Do the restart (never when `dry_run`) and say what happened."""

    def retire(self, pids: Iterable[int]) -> None:
        """Remember pids this backend killed for a restart (bounded), so findings about them are stale."""
        for pid in pids:
            self._retired[pid] = None
        while len(self._retired) > MAX_RETIRED:
            del self._retired[next(iter(self._retired))]

    def retired(self, pid: int) -> bool:
        """True when `pid` belonged to a run this backend already killed and restarted."""
        return pid in self._retired

    def pids(self, job: str) -> set[int] | None:
        """Pids this backend itself runs for `job` now; None when it cannot know."""
        del job
        return None

    def samples(self) -> list[Sample]:
        """Metrics of the backend (e.g. commands run)."""
        return []
