"""How much one HTTP client may take: the `[daemon.http]` section, read by the daemon's server.

It lives at the bottom layer beside `config.py`, which embeds it as `DaemonConfig.http`, so
check-config, start-up and SIGHUP validate it in their one code path; `daemon.http` re-exports it.

    [daemon.http]
    workers = 4
    head_seconds = 10.0
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MAX_CONNECTIONS = 1_000_000
"""Far above what one node's open-file limit allows; the server lowers it to fit that limit anyway."""
MAX_BACKLOG = 65_535
"""Linux caps listen() at net.core.somaxconn, whose largest value is 65535 before kernel 5.4."""
MAX_WORKERS = 256
MAX_HEAD_BYTES = 1 << 20
MIN_HEAD_BYTES = 1024
"""Below this a normal browser or Prometheus request head (Accept, User-Agent, ...) would be refused."""
MAX_ACCEPTS_PER_TURN = 1024
MAX_LANE_CONNECTIONS = 64
"""The lane is for scrapers; more than a few dozen would make it a second main loop."""


@dataclass(frozen=True)
class HttpLimits:
    """How much one client may take; every limit ends in an answer or a close, never a hang."""

    workers: int = 4
    """Threads running handlers; connections waiting on the network hold none."""
    max_connections: int = 4096
    """Open connections; one more is answered 503 and closed."""
    backlog: int = 1024
    """Listen backlog: a burst of connects waits in the kernel instead of being dropped."""
    accepts_per_turn: int = 32
    """New connections taken per event-loop turn: a burst waits in the kernel's queue rather than
    in front of a scrape (docs/BENCHMARKS.md, "HTTP server under hostile clients")."""
    lane_connections: int = 8
    """Kept-alive scrapers served on the scrape lane, a thread of their own (0: none); more stay on
    the main loop. Prometheus, or an HA pair of them, needs one or two."""
    head_seconds: float = 10.0
    """From a new connection (or a request's first byte on a kept-alive one) to the end of the head."""
    request_seconds: float = 30.0
    """From the start of a request to the last byte of its body."""
    idle_seconds: float = 120.0
    """A kept-alive connection with no new request is closed after this (Prometheus reuses it)."""
    write_seconds: float = 30.0
    """To hand the whole answer to a client that does not read it."""
    max_head_bytes: int = 16 * 1024
    """Request line + headers (431 above it)."""
    max_target_bytes: int = 8 * 1024
    """Request line (414 above it)."""

    def problems(self) -> list[tuple[str, str]]:
        """(key, why) for each limit out of its range; the loader already made every number finite."""
        found: list[tuple[str, str]] = []
        for key, low, high in (
            ("workers", 1, MAX_WORKERS),
            ("max_connections", 1, MAX_CONNECTIONS),
            ("backlog", 1, MAX_BACKLOG),
            ("accepts_per_turn", 1, MAX_ACCEPTS_PER_TURN),
            ("lane_connections", 0, MAX_LANE_CONNECTIONS),
            ("max_head_bytes", MIN_HEAD_BYTES, MAX_HEAD_BYTES),
            ("max_target_bytes", 64, MAX_HEAD_BYTES),
        ):
            value = getattr(self, key)
            if not low <= value <= high:
                found.append((key, f"must be between {low} and {high}, got {value}"))
        found.extend(
            (f.name, f"must be > 0, got {getattr(self, f.name)}")
            for f in fields(self)
            if f.name.endswith("_seconds") and not getattr(self, f.name) > 0
        )
        if self.max_target_bytes > self.max_head_bytes:
            why = f"must be <= max_head_bytes ({self.max_head_bytes}), got {self.max_target_bytes}"
            found.append(("max_target_bytes", why))
        return found
