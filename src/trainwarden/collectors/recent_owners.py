"""pid → rank lookups that survive the rank's exit for a while.

The training collector forgets a pid as soon as its connection closes, but evidence about that
process arrives later: the OOM killer's kernel line, the last NCCL Inspector records flushed at
exit. Collectors that attribute such evidence refresh this from `CollectorContext.pid_owners`
each run and look pids up here.
"""

from __future__ import annotations

from trainwarden.collectors.base import PidOwners, RankIdentity

MEMORY_SECONDS = 120.0
"""How long a pid stays attributable after the training collector forgot it."""


class RecentOwners:
    """A collector-local memory of pid owners (used from one collector thread only)."""

    def __init__(self, owners: PidOwners, memory_seconds: float = MEMORY_SECONDS) -> None:
        self._owners = owners
        self._memory_seconds = memory_seconds
        self._seen: dict[int, tuple[RankIdentity, float]] = {}

    def refresh(self, now: float) -> None:
        """Remember every current owner; forget those gone for longer than the memory."""
        for pid, identity in self._owners.snapshot().items():
            self._seen[pid] = (identity, now)
        for pid in [p for p, (_, seen) in self._seen.items() if now - seen > self._memory_seconds]:
            del self._seen[pid]

    def get(self, pid: int) -> RankIdentity | None:
        """The rank owning `pid` now, or owning it until recently."""
        current = self._owners.get(pid)
        if current is not None:
            return current
        remembered = self._seen.get(pid)
        return remembered[0] if remembered is not None else None
