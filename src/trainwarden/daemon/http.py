"""The daemon's HTTP face: a route table of `Request -> Response` handlers behind a hardened server.

How to add an endpoint (the Alertmanager webhook does exactly this)::

    def receive(request: Request) -> Response:
        alerts = parse(request.body)              # the complete body, de-chunked
        work_queue.put_nowait(alerts)             # hand the work to your own thread...
        return Response.json({"accepted": len(alerts)})  # ...and answer at once

    routes.add("POST", "/api/v1/alerts", receive, max_body_bytes=256 * 1024)

- `Routes.add(method, path, handler, max_body_bytes=MAX_BODY_BYTES)`: exact method and path.
  The same path with another method gets 405 with `Allow`, an unknown path 404; HEAD is served
  by the GET route without the body.
- `Request`: `method`, `path`, `query` (`parse_qs`), `headers` (lower-case names, repeated fields
  joined with ", "; `request.header(name)` is case-insensitive), `body` (bytes, complete, whether
  sent with Content-Length or chunked), `client` (peer address).
- A body over the route's `max_body_bytes` is answered 413 before the handler runs: at once when
  its Content-Length says so (an `Expect: 100-continue` client never sends it), as soon as a
  chunked body passes the limit otherwise. A handler only ever sees complete, well-framed bodies.
- Handlers run on a pool of `HttpLimits.workers` threads and may block briefly; one that raises
  gives a 500 and one log line with its traceback. `add(..., inline=True)` runs a handler on
  the event loop instead (no hand-off, no queue): only for ones that never block and take
  milliseconds, like /metrics and /healthz; `lane=True` as well (/metrics) moves a kept-alive
  client of that route to the scrape lane (`http_lane`), a loop on its own thread that a burst
  on the main loop cannot hold up. To answer 2xx fast, return the response and
  let your own thread do the work, or set `Response(..., after=fn)`: `fn` runs on the pool once
  the answer has been written (keep it short; it holds a worker).
- Every answer is counted in `trainwarden_http_requests_total{handler,code}`: handler is the
  route's path (a 413 too), "other" for unknown paths, "invalid" for what the server refuses
  before any route (malformed or ambiguously framed 400, too slow 408, 414, 431, a transfer
  coding other than chunked 501), "overload" past the connection limit (503). A connection
  closed before it sent a byte gets no answer and is not counted. Tests call handlers without
  sockets.

Why this server. The stdlib `ThreadingHTTPServer` it replaces held one thread per connection
with no deadline, a listen backlog of 5, and framing left to the caller (docs/BENCHMARKS.md,
"HTTP server under hostile clients", has the before/after measurements). Here an asyncio
server holds every connection without a thread, each under a head, a request, an idle and a
write deadline; h11, python-hyper's HTTP/1.1 state machine, parses and frames strictly; a fixed
pool of worker threads runs handlers, so threads stay bounded whatever clients do. waitress and
aiohttp were the alternatives considered (not benchmarked): both answer malformed requests
themselves, outside the application, so those answers could not be counted without reaching
into their internals; waitress's one deadline is an inactivity timeout, which a client sending
a byte a second never trips; aiohttp would bring a whole web framework to a daemon that needs a
handful of routes. h11 is small, pure Python and does only the part that is easy to get wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.exposition import gzip_accepted
from prometheus_client.registry import CollectorRegistry

from trainwarden.daemon.encoding import fast_encoder
from trainwarden.daemon.http_connection import Connection, HttpLimits
from trainwarden.daemon.http_lane import ScrapeLane
from trainwarden.daemon.http_routes import MAX_BODY_BYTES, Handler, Request, Response, Route, Routes
from trainwarden.model import MetricKind, MetricSpec
from trainwarden.store import Store

__all__ = [
    "MAX_BODY_BYTES",
    "Handler",
    "HttpLimits",
    "HttpServer",
    "Request",
    "Response",
    "Route",
    "Routes",
    "metrics_handler",
]

log = logging.getLogger(__name__)

SOURCE = "http"

REQUESTS = MetricSpec(
    "trainwarden_http_requests_total",
    "HTTP requests answered, by route (other = no such route, invalid = refused by the server"
    " before any route: malformed, too large, too slow; overload = over the connection limit)"
    " and status code.",
    MetricKind.COUNTER,
    ("handler", "code"),
)


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """`/metrics`: text or OpenMetrics as the scraper's Accept asks, gzipped when accepted.

    Negotiation is prometheus_client's `choose_encoder`; the bytes come from `encoding`.
    """

    def handle(request: Request) -> Response:
        encoder, content_type = fast_encoder(request.header("Accept"))
        body = encoder(registry)
        headers: tuple[tuple[str, str], ...] = ()
        if gzip_accepted(request.header("Accept-Encoding")):
            body = gzip.compress(body, compresslevel=1)
            headers = (("Content-Encoding", "gzip"),)
        return Response(200, body, content_type, headers)

    return handle


class HttpServer:
    """An asyncio server on its own thread; handlers run on a small pool of worker threads."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Routes,
        store: Store | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.routes = routes
        self.limits = _within_open_files(limits or HttpLimits())
        self._store = store
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        # Bound here, so a taken port fails the caller at once.
        self._socket = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=self.limits.backlog,
        )
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="trainwarden-http-worker")
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_log_loop_error)
        self._connections: set[asyncio.Task[None]] = set()
        self._finished_lock = threading.Lock()
        self.connections_finished = 0
        """Connections accepted and finished with, whatever their end (tests wait on it)."""
        self._lane = (
            ScrapeLane(
                self.limits.lane_connections,
                write_seconds=self.limits.write_seconds,
                on_finished=self._finished,
                exception_handler=_log_loop_error,
            )
            if self.limits.lane_connections > 0
            else None
        )
        self._stopping: asyncio.Event | None = None
        self._serving = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainwarden-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def alive(self) -> bool:
        """True while the serving thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Serve in the background; returns once connections are being accepted."""
        if self._lane is not None:
            self._lane.start()
        self._thread.start()
        self._serving.wait(10.0)

    def stop(self) -> None:
        """Stop accepting, drop open connections and wait for the serving thread."""
        if self._thread.is_alive() and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10.0)
        elif not self._thread.is_alive():
            self._socket.close()
        if self._lane is not None:
            self._lane.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def dispatch(self, request: Request) -> Response:
        """Route one request, turning handler crashes into 500s; counts every answer."""
        route, allowed = self.routes.route(request.method, request.path)
        return self._call(route, allowed, request)

    def count(self, handler: str, status: int) -> None:
        """Count one answer and publish the counters to the store."""
        with self._lock:
            key = (handler, str(status))
            self._counts[key] = self._counts.get(key, 0) + 1
            samples = [REQUESTS.sample(n, handler=h, code=c) for (h, c), n in self._counts.items()]
        if self._store is not None:
            self._store.replace(SOURCE, samples, time.time())

    def _call(self, route: Route | None, allowed: list[str], request: Request) -> Response:
        label = request.path if route is not None or allowed else "other"
        if route is None:
            if allowed:
                response = Response(
                    405,
                    f"{request.method} not allowed on {request.path}\n".encode(),
                    headers=(("Allow", ", ".join(allowed)),),
                )
            else:
                response = Response.text(f"no such endpoint: {request.path}\n", 404)
        else:
            try:
                response = route.handler(request)
            except Exception:
                log.exception("handler for %s %s failed", request.method, request.path)
                response = Response.text("internal error; see the daemon's log\n", 500)
        self.count(label, response.status)
        return response

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        # asyncio accepts up to `backlog` connections per loop turn; a small batch lets a scrape
        # in the middle of a 1,000-connect burst be served between batches. The kernel's queue
        # keeps the full backlog (listen() again after asyncio set it to the batch size).
        server = await asyncio.start_server(
            self._accept, sock=self._socket, backlog=self.limits.accepts_per_turn
        )
        self._socket.listen(self.limits.backlog)
        self._serving.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            self._socket.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.open_connections >= self.limits.max_connections:
            self.count("overload", 503)
            writer.write(_OVERLOADED)
            writer.close()
            self._finished()
            return
        self._connections.add(task)
        moved = False
        try:
            connection = Connection(
                reader,
                writer,
                limits=self.limits,
                resolve=self.routes.route,
                dispatch=self._dispatch,
                count=self.count,
            )
            connection.after = self._after
            if self._lane is not None:
                lane = self._lane

                async def handover(connection: Connection) -> bool:
                    nonlocal moved
                    moved = await lane.take(connection)
                    return moved

                connection.handover = handover
            await connection.serve()
        except asyncio.CancelledError:
            return  # the server is stopping; asyncio's streams would log a re-raised cancel
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("http connection from %s failed", writer.get_extra_info("peername"))
            writer.transport.abort()
        finally:
            self._connections.discard(task)
            if not moved:  # a moved connection is finished by the lane
                self._finished()

    @property
    def open_connections(self) -> int:
        """Connections held now, on the main loop and on the scrape lane."""
        return len(self._connections) + (self._lane.held if self._lane is not None else 0)

    def _finished(self) -> None:
        with self._finished_lock:
            self.connections_finished += 1

    async def _dispatch(self, route: Route | None, allowed: list[str], request: Request) -> Response:
        if route is None or route.inline:  # 404 / 405 and inline routes need no thread
            return self._call(route, allowed, request)
        # The running loop: the main one, or the scrape lane's for a moved connection.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, route, allowed, request)

    def _after(self, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except Exception:
                log.exception("work after an HTTP answer failed")

        self._pool.submit(run)


_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 21\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections\n"
)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """One line instead of asyncio's traceback: the loop reports what a client made fail."""
    del loop
    exc = context.get("exception")
    log.warning("http server: %s%s", context.get("message", "error"), f": {exc!r}" if exc else "")


def _within_open_files(limits: HttpLimits) -> HttpLimits:
    """Raise the soft open-file limit to fit the connections; else lower the connection limit.

    systemd's default soft limit is 1024, below 600 held clients plus a 1,000-connect burst.
    """
    reserve = 256  # journal, collectors, the training socket's clients
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + reserve
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-file limit: %s", exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        return dataclasses.replace(limits, max_connections=max(1, soft - reserve))
    return limits
