"""A real `HttpServer` on loopback with a few routes, raw-socket clients and a log trap.

Shared by the hostile-client regression tests and the fuzz test.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from support import wait_until
from trainwarden.daemon.exporter import make_registry
from trainwarden.daemon.http import HttpLimits, HttpServer, Request, Response, Routes, metrics_handler
from trainwarden.store import Store

ECHO_LIMIT = 1024
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


@dataclass
class Served:
    """The server under test, what its handlers saw, and a gate that holds /slow open."""

    server: HttpServer
    calls: list[Request] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    after_done: threading.Event = field(default_factory=threading.Event)
    stall_gate: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    opened: int = 0

    @property
    def port(self) -> int:
        return self.server.address[1]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.settimeout(10)
        self.opened += 1
        return sock

    def exchange(self, data: bytes, *, shutdown: bool = True) -> bytes:
        """Send `data`, optionally half-close, and read until the server closes."""
        with self.connect() as sock:
            sock.sendall(data)
            if shutdown:
                # A server that answers and closes first (a 503 over the connection limit) leaves
                # nothing to half-close; what it sent is still there to read.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            return read_all(sock)

    def counts(self) -> dict[tuple[str, str], int]:
        return dict(self.server._counts)

    def total(self) -> int:
        return sum(self.server._counts.values())

    def idle(self) -> bool:
        """The server has finished with every connection this side opened."""
        return self.server.connections_finished >= self.opened

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A normal GET /metrics, parsed."""
        answer = self.exchange(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


def statuses(data: bytes) -> list[int] | None:
    """Final status codes of the answers that make up `data` exactly; None if it is not such a sequence.

    Every answer here carries Content-Length; an answer to HEAD carries it without the body, so
    both readings are tried.
    """

    def parse(at: int) -> list[int] | None:
        if at == len(data):
            return []
        match = _STATUS.match(data, at)
        end = data.find(b"\r\n\r\n", at)
        if match is None or end < 0:
            return None
        length = re.search(rb"\r\ncontent-length: (\d+)", data[at:end].lower())
        status = int(match.group(1))
        for body in dict.fromkeys([int(length.group(1)) if length else 0, 0]):
            rest = parse(end + 4 + body)
            if rest is not None:
                return ([status] if status >= 200 else []) + rest
        return None

    return parse(0)


class LogTrap(logging.Handler):
    """Keeps every record of every logger, from every thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [self.format(r) for r in self.records if r.exc_info or r.stack_info]

    def above_debug(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno > logging.DEBUG]


@contextmanager
def trapped_logs() -> Iterator[LogTrap]:
    trap = LogTrap()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(trap)
    root.setLevel(logging.DEBUG)
    try:
        yield trap
    finally:
        root.removeHandler(trap)
        root.setLevel(old_level)


@contextmanager
def serve(limits: HttpLimits | None = None) -> Iterator[Served]:
    """The real server on 127.0.0.1: inline /metrics (on the scrape lane) and /healthz; POST /echo,
    POST /accept, GET /slow; GET /stall, inline, blocks the main event loop until `stall_gate` is set."""
    store = Store()
    routes = Routes()
    routes.add("GET", "/metrics", metrics_handler(make_registry(store)), inline=True, lane=True)
    routes.add("GET", "/healthz", lambda _request: Response.text("ok\n"), inline=True)
    server = HttpServer("127.0.0.1", 0, routes, store=store, limits=limits)
    served = Served(server)

    def echo(request: Request) -> Response:
        served.calls.append(request)
        return Response(200, request.body, "application/octet-stream")

    def slow(request: Request) -> Response:
        served.calls.append(request)
        served.entered.set()
        served.gate.wait(10)
        return Response(200, b"x" * (1 << 20))

    def accept(request: Request) -> Response:
        def work() -> None:
            served.gate.wait(10)
            served.after_done.set()

        served.calls.append(request)
        return Response(202, b"accepted\n", after=work)

    def stall(_request: Request) -> Response:
        served.stalled.set()
        served.stall_gate.wait(30)
        return Response.text("stalled\n")

    routes.add("GET", "/stall", stall, inline=True)
    routes.add("POST", "/echo", echo, max_body_bytes=ECHO_LIMIT)
    routes.add("POST", "/accept", accept)
    routes.add("GET", "/slow", slow)
    server.start()
    try:
        yield served
    finally:
        served.gate.set()
        served.stall_gate.set()
        server.stop()
        wait_until(lambda: not server.alive, 10, "the server thread to stop")
