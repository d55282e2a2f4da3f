"""What an HTTP handler sees and returns, and the table that maps method + path to a handler.

Kept apart from the server so handlers and their tests need no sockets; `daemon.http`
re-exports everything here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 1 << 20
"""A route's body limit unless it names its own (an Alertmanager batch is far smaller)."""


@dataclass(frozen=True)
class Request:
    """One complete HTTP request: the body is every byte of it, already de-chunked.

    Header names are lower-case; a field sent more than once is joined with ", ".
    """

    method: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    client: str = ""

    def header(self, name: str, default: str = "") -> str:
        """A header value, case-insensitively."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return default


@dataclass(frozen=True)
class Response:
    """What a handler returns.

    `after`, when set, runs on the server's worker pool once the answer has been written:
    the way to answer 2xx at once and do the work afterwards.
    """

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    after: Callable[[], None] | None = None

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        """A plain-text response."""
        return cls(status, text.encode())

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n", "application/json")


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    """One endpoint: its handler, the largest body it accepts (413 above it), where it runs.

    `inline` handlers run on the server's event loop: no thread hand-off and no queue behind
    other requests, for handlers that never block and finish in milliseconds (/metrics,
    /healthz). Everything else runs on the worker pool, where blocking costs one worker.

    `lane` (inline routes only): a kept-alive connection that asked this route is served from
    then on by the server's scrape lane, an event loop on a thread of its own, so that a scraper
    never waits in line behind a burst of other clients on the main loop (/metrics).
    """

    handler: Handler
    max_body_bytes: int = MAX_BODY_BYTES
    inline: bool = False
    lane: bool = False


class Routes:
    """Method + exact path → route. HEAD is answered by the GET route, without the body."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Route] = {}

    def add(
        self,
        method: str,
        path: str,
        handler: Handler,
        max_body_bytes: int = MAX_BODY_BYTES,
        *,
        inline: bool = False,
        lane: bool = False,
    ) -> None:
        """Register one endpoint; registering the same one twice is a programming error."""
        key = (method.upper(), path)
        if key in self._routes:
            raise ValueError(f"route {method} {path} registered twice")
        if max_body_bytes < 0:
            raise ValueError(f"route {method} {path}: max_body_bytes must be >= 0")
        if lane and not inline:
            raise ValueError(f"route {method} {path}: only an inline route can move its client to the lane")
        self._routes[key] = Route(handler, max_body_bytes, inline=inline, lane=lane)

    def paths(self) -> list[str]:
        """Every registered path, sorted (for the landing page)."""
        return sorted({path for _, path in self._routes})

    def route(self, method: str, path: str) -> tuple[Route | None, list[str]]:
        """The route, or None plus the methods this path does allow (empty: unknown path)."""
        method = method.upper()
        found = self._routes.get((method, path))
        if found is None and method == "HEAD":
            found = self._routes.get(("GET", path))
        if found is not None:
            return found, []
        return None, sorted(m for m, p in self._routes if p == path)

    def resolve(self, method: str, path: str) -> tuple[Handler | None, list[str]]:
        """The handler, or None plus the methods this path does allow (empty: unknown path)."""
        found, allowed = self.route(method, path)
        return (found.handler if found is not None else None), allowed
