"""The daemon's HTTP face: a stdlib threading server dispatching through a small route table.

Handlers are plain functions `Request -> Response`, so a later feature adds an endpoint with one
line (`routes.add("POST", "/alertmanager", handler)`) and tests call handlers without sockets.
Every request is counted by route and status code (unknown paths share one label value, so a
scanner cannot blow up the series count).
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import gzip_accepted
from prometheus_client.registry import CollectorRegistry

from trainwarden.daemon.encoding import fast_encoder
from trainwarden.model import MetricKind, MetricSpec
from trainwarden.store import Store

log = logging.getLogger(__name__)

SOURCE = "http"
MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (an Alertmanager batch is far smaller)."""

REQUESTS = MetricSpec(
    "trainwarden_http_requests_total",
    "HTTP requests answered, by route (other = no such route) and status code.",
    MetricKind.COUNTER,
    ("handler", "code"),
)


@dataclass(frozen=True)
class Request:
    """What a handler sees of one HTTP request."""

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
    """What a handler returns."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        """A plain-text response."""
        return cls(status, text.encode())

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n", "application/json")


Handler = Callable[[Request], Response]


class Routes:
    """Method + exact path → handler."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Handler] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Register one endpoint; registering the same one twice is a programming error."""
        key = (method.upper(), path)
        if key in self._routes:
            raise ValueError(f"route {method} {path} registered twice")
        self._routes[key] = handler

    def paths(self) -> list[str]:
        """Every registered path, sorted (for the landing page)."""
        return sorted({path for _, path in self._routes})

    def resolve(self, method: str, path: str) -> tuple[Handler | None, list[str]]:
        """The handler, or None plus the methods this path does allow (empty: unknown path)."""
        handler = self._routes.get((method.upper(), path))
        if handler is not None:
            return handler, []
        return None, sorted(m for m, p in self._routes if p == path)


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
    """A `ThreadingHTTPServer` on its own thread, serving `routes`."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Routes,
        store: Store | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.routes = routes
        self._store = store
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        handler_cls = type("_BoundHandler", (_RequestHandler,), {"server_app": self})
        server_cls = _Server6 if ":" in host else _Server
        self._server = server_cls((host, port), handler_cls)
        self.max_body_bytes = max_body_bytes
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="trainwarden-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def alive(self) -> bool:
        """True while the serving thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, finish the current request loop and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def dispatch(self, request: Request) -> Response:
        """Route one request, turning handler crashes into 500s; counts every answer."""
        handler, allowed = self.routes.resolve(request.method, request.path)
        label = request.path if handler is not None or allowed else "other"
        if handler is None:
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
                response = handler(request)
            except Exception:
                log.exception("handler for %s %s failed", request.method, request.path)
                response = Response.text("internal error; see the daemon's log\n", 500)
        self.count(label, response.status)
        return response

    def count(self, handler: str, status: int) -> None:
        """Count one answer and publish the counters to the store."""
        with self._lock:
            key = (handler, str(status))
            self._counts[key] = self._counts.get(key, 0) + 1
            samples = [REQUESTS.sample(n, handler=h, code=c) for (h, c), n in self._counts.items()]
        if self._store is not None:
            self._store.replace(SOURCE, samples, time.time())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _RequestHandler(BaseHTTPRequestHandler):
    """Turns stdlib handler calls into `Request`s for `HttpServer.dispatch`."""

    server_app: ClassVar[HttpServer]
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes; with Nagle on, a keep-alive scraper waits ~40 ms for
    # the delayed ACK in between.
    disable_nagle_algorithm = True
    timeout = 30  # a slow client cannot hold a thread forever
    server_version = "trainwarden"

    def do_GET(self) -> None:
        """Handle GET."""
        self._handle("GET")

    def do_POST(self) -> None:
        """Handle POST."""
        self._handle("POST")

    def _handle(self, method: str) -> None:
        app = self.server_app
        url = urlsplit(self.path)
        body = b""
        length_text = self.headers.get("Content-Length", "0") or "0"
        if not length_text.isdigit():
            self._send(Response.text("bad Content-Length\n", 400))
            app.count("other", 400)
            return
        length = int(length_text)
        if length > app.max_body_bytes:
            self._send(Response.text(f"body over {app.max_body_bytes} bytes\n", 413))
            app.count("other", 413)
            self.close_connection = True
            return
        if length:
            body = self.rfile.read(length)
        request = Request(
            method=method,
            path=url.path or "/",
            query=parse_qs(url.query),
            headers=dict(self.headers.items()),
            body=body,
            client=str(self.client_address[0]),
        )
        self._send(app.dispatch(request))

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Access log at debug level only: Prometheus scrapes would flood the journal."""
        log.debug("%s %s", self.client_address[0], format % args)
