"""A rank that dies is a `process_gone` finding the moment it dies, handed to the policy at once.

Every rank's pid (from its hello) is watched through a pidfd (`backends.exit_watch`). When one
exits without having said goodbye, this builds the same finding the `process_gone` rule would build
at its next tick (same rule, subject and evidence, so the policy counts them as one fault) and
decides on it now. The restart that follows kills the surviving ranks of the job with it, so they
are not left waiting for a dead peer until a gloo or NCCL timeout.

Before deciding, it waits (bounded) for the rank's connection to close: the kernel closes the socket
of a process that exited, and the training collector reads everything it had sent first, so a `bye`
written just before a clean exit is never mistaken for a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from trainwarden.backends.exit_watch import ExitWatcher
from trainwarden.model import Finding, RankProcess, Severity
from trainwarden.protocol import Hello, Record
from trainwarden.rules.training import LAST_STEP_TS
from trainwarden.store import Store

log = logging.getLogger(__name__)

RULE = "process_gone"
SOURCE = "exit_watch"
CLOSE_WAIT_SECONDS = 2.0  # a dead process's socket closes at once; this only bounds a stuck reader


class RankExits:
    """Watches every rank that says hello; decides on a crash the moment a rank's process ends."""

    def __init__(
        self,
        *,
        ranks: Callable[[], Sequence[RankProcess]],
        decide: Callable[[list[Finding]], object],
        store: Store,
        clock: Callable[[], float] = time.time,
        accept: Callable[[int], bool] = lambda _pid: True,
        ignore: Callable[[int], bool] = lambda _pid: False,
        on_crash: Callable[[Finding], None] | None = None,
    ) -> None:
        """Watch ranks whose pid passes `accept`; an exit `ignore` vouches for is not news.

        `accept`: e.g. it descends from the supervised child; `ignore`: a restart killed it, or the
        run is stopping; `on_crash` is told of the finding before the policy decides on it.
        """
        self._ranks = ranks
        self._decide = decide
        self._store = store
        self._clock = clock
        self._accept = accept
        self._ignore = ignore
        self._on_crash = on_crash
        self._watcher = ExitWatcher(self._exited)
        self.crashes = 0
        self._lock = threading.Lock()
        self._handling = 0  # exits seen whose decision has not returned yet

    def on_record(self, now: float, job: str, rank: int, pid: int, record: Record) -> None:
        """A record listener of the training collector: watch each rank from its hello on."""
        del now, job, rank
        if isinstance(record, Hello) and self._accept(pid):
            self._watcher.watch(pid)

    def stop(self) -> None:
        """Stop watching."""
        self._watcher.stop()

    def busy(self) -> bool:
        """True while a rank's exit is being looked at or decided on (the job's own exit waits for it)."""
        with self._lock:
            return self._handling > 0

    def _exited(self, pid: int) -> None:
        with self._lock:
            self._handling += 1
        try:
            self._handle(pid)
        finally:
            with self._lock:
                self._handling -= 1

    def _handle(self, pid: int) -> None:
        seen = self._clock()
        if self._ignore(pid):
            return
        rank = self._closed_rank(pid)
        if rank is None or rank.exited_cleanly or self._ignore(pid):
            return
        finding = gone_finding(rank, seen, self._store)
        with self._lock:
            self.crashes += 1
        log.info("rank %d of job %s (pid %d) exited without a goodbye", rank.rank, rank.job, pid)
        if self._on_crash is not None:
            self._on_crash(finding)
        self._decide([finding])

    def _closed_rank(self, pid: int) -> RankProcess | None:
        """The rank of `pid` once its connection closed (its last records read); None if not a rank."""
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while True:
            rank = next((r for r in self._ranks() if r.pid == pid), None)
            if rank is None or not rank.connected or time.monotonic() >= deadline:
                return rank
            time.sleep(0.005)


def gone_finding(rank: RankProcess, seen: float, store: Store) -> Finding:
    """The `process_gone` finding of a rank whose process ended at `seen` (as the rule words it)."""
    evidence: dict[str, float | str] = {"interruption": "transient", "pid": rank.pid}
    last_step = store.value(LAST_STEP_TS, job=rank.job, rank=str(rank.rank))
    if last_step is not None:
        evidence["observed_at"] = last_step
    return Finding(
        RULE,
        {"job": rank.job, "rank": str(rank.rank)},
        Severity.CRITICAL,
        f"rank {rank.rank} of job {rank.job}: process {rank.pid} is gone",
        since=seen,
        evidence=evidence,
        source=SOURCE,
    )
