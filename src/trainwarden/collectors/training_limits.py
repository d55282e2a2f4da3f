"""Who may hold the training socket: idle and unknown clients must never starve real ranks.

Connections are bounded in total and per uid; one that sends no hello within
`hello_timeout_seconds`, or nothing at all for `idle_timeout_seconds`, is closed (a live client
reconnects with its next record). When a limit is reached, the least recently active connection
that is evictable (no hello after a second, or idle beyond `evict_idle_seconds`) makes room for the
new one.
The rank table works the same way: a new rank may replace the least recently active entry that is
disconnected, idle beyond `evict_idle_seconds`, or never reported a step within the hello timeout,
so made-up hellos cannot lock a real job out until the retention expires.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class Limits:
    """The socket's bounds, from `TrainingOptions`."""

    max_connections: int
    max_connections_per_uid: int
    hello_timeout_seconds: float
    idle_timeout_seconds: float
    evict_idle_seconds: float


class ConnectionView(Protocol):
    """What the limits read of a connection (times from one monotonic clock)."""

    uid: int
    opened: float
    last_active: float
    key: tuple[str, int] | None


class RankView(Protocol):
    """What the limits read of a rank entry (times from the collector's clock)."""

    connected: bool
    last_seen: float
    last_step_ts: float | None


UNBOUND_GRACE_SECONDS = 1.0
"""A connection without a hello is evictable after this long (a real client sends its hello at once)."""

C = TypeVar("C", bound=ConnectionView)
K = TypeVar("K")


def timed_out(conns: Iterable[C], now: float, limits: Limits) -> list[C]:
    """Connections to close: no hello within the hello timeout, or silent beyond the idle timeout."""
    return [
        c
        for c in conns
        if (c.key is None and now - c.opened > limits.hello_timeout_seconds)
        or now - c.last_active > limits.idle_timeout_seconds
    ]


def admit(conns: Sequence[C], uid: int, now: float, limits: Limits) -> tuple[bool, C | None]:
    """Whether a new connection of `uid` may stay, and which connection to evict for it first."""
    mine = [c for c in conns if c.uid == uid]
    per_uid_full = len(mine) >= limits.max_connections_per_uid
    if len(conns) < limits.max_connections and not per_uid_full:
        return True, None
    pool = mine if per_uid_full else conns
    evictable = [
        c
        for c in pool
        if now - c.last_active > (UNBOUND_GRACE_SECONDS if c.key is None else limits.evict_idle_seconds)
    ]
    if not evictable:
        return False, None
    return True, min(evictable, key=lambda c: c.last_active)


def rank_to_evict(ranks: Mapping[K, RankView], now: float, limits: Limits) -> K | None:
    """The entry a new rank may replace in a full table, or None when every entry is in real use."""
    candidates = [
        (state.last_step_ts is not None, state.last_seen, key)
        for key, state in ranks.items()
        if not state.connected
        or now - state.last_seen > limits.evict_idle_seconds
        or (state.last_step_ts is None and now - state.last_seen > limits.hello_timeout_seconds)
    ]
    if not candidates:
        return None
    # Entries that never reported a step go first, then the least recently active.
    return min(candidates, key=lambda c: (c[0], c[1]))[2]
