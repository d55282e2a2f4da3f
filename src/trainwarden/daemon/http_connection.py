"""One HTTP/1.1 connection: h11 frames it, deadlines bound it, every answer is counted.

h11 (python-hyper's HTTP/1.1 state machine) does the parsing and the framing: Content-Length
must be ASCII digits and agree with itself, chunked bodies are decoded, a body cut short is an
error rather than a request. On top of it this module adds what h11 leaves to the server:
deadlines for the head and for the whole request, size limits, a refusal of requests whose
length is ambiguous (Content-Length repeated, or together with Transfer-Encoding), and one
rule for everything that never reaches a route: answer with a status, count it under the
handler label "invalid", close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11

from trainwarden.daemon.http_routes import Request, Response, Route
from trainwarden.http_limits import HttpLimits

__all__ = ["INVALID", "Connection", "HttpLimits"]

log = logging.getLogger("trainwarden.daemon.http")

INVALID = "invalid"
"""Handler label of answers the server gives itself: malformed, too large, too slow."""

_READ_BYTES = 65536
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20
_HEAD_END = re.compile(rb"\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


class _DoneError(Exception):
    """The exchange is over: the peer went away or the connection was answered and closed."""


class _RefusedError(Exception):
    """The request is answered by the server itself, then the connection is closed."""

    def __init__(self, status: int, why: str, label: str = INVALID) -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.label = label


Dispatch = Callable[[Route | None, list[str], Request], Awaitable[Response]]
Count = Callable[[str, int], None]
Resolve = Callable[[str, str], tuple[Route | None, list[str]]]
Handover = Callable[["Connection"], Awaitable[bool]]
"""Takes a kept-alive connection whose last request was on a lane route; True once it is moved."""


class Connection:
    """Serves the requests of one client, one at a time, until it closes or breaks a rule."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        limits: HttpLimits,
        resolve: Resolve,
        dispatch: Dispatch,
        count: Count,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._limits = limits
        self._resolve = resolve
        self._dispatch = dispatch
        self._count = count
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes + 1)
        self._loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else ""
        self._request_deadline = self._loop.time() + limits.request_seconds
        self.after: Callable[[Callable[[], None]], None] = lambda _fn: None
        self.handover: Handover | None = None
        self._last_route: Route | None = None

    @property
    def reader(self) -> asyncio.StreamReader:
        """The stream this connection reads (the server's handover takes what it still holds)."""
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        """The stream this connection answers on."""
        return self._writer

    @property
    def has_unparsed_input(self) -> bool:
        """Bytes received after the last request that h11 holds unparsed (a pipelined request)."""
        return bool(self._h11.trailing_data[0])

    def rebind(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, unread: bytes) -> None:
        """Carry on on new streams of the same socket, in the running loop, with `unread` first."""
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        if unread:  # receive_data(b"") would tell h11 the client closed
            self._h11.receive_data(unread)

    async def serve(self, *, first: bool = True) -> None:
        """Answer requests until the client is done or moved; never raises for anything a client does.

        `first`: False when this connection already served requests elsewhere (handed over).
        """
        try:
            while await self._exchange(first=first):
                first = False
                lane = self._last_route is not None and self._last_route.lane
                if lane and self.handover is not None and await self.handover(self):
                    return  # served on from now on by the lane
            # Unread input (a body never read, bytes pipelined behind a last request) needs a
            # lingering close; a client that sent exactly one request does not.
            linger = self._h11.their_state is not h11.DONE or bool(self._h11.trailing_data[0])
        except _DoneError:
            linger = False
        except _RefusedError as refusal:
            await self._refuse(refusal)
            linger = True
        except (ConnectionError, OSError) as exc:
            log.debug("http client %s went away: %s", self.client, exc)
            linger = False
        except asyncio.CancelledError:
            self._writer.transport.abort()
            raise
        await self._close(linger=linger)

    async def _close(self, *, linger: bool) -> None:
        """Close after the answer is out; with `linger`, read what the client still sends first.

        Closing a socket with unread input makes the kernel send a reset, which can destroy an
        answer (a 413 to a client still sending its body) before the client reads it.
        """
        writer = self._writer
        try:
            if linger and not writer.is_closing():
                if writer.can_write_eof():
                    writer.write_eof()
                async with asyncio.timeout(_LINGER_SECONDS):
                    await self._discard_input()
            writer.close()
            async with asyncio.timeout(self._limits.write_seconds):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    async def _discard_input(self) -> None:
        left = _LINGER_BYTES
        while left > 0:
            data = await self._reader.read(_READ_BYTES)
            if not data:
                return
            left -= len(data)

    async def _exchange(self, *, first: bool) -> bool:
        """One request and its answer; True when the connection may carry another."""
        head, event = await self._read_head(first=first)
        deadline = self._request_deadline
        target = event.target.decode("ascii", "replace")
        url = urlsplit(target)
        path = url.path or "/"
        method = event.method.decode("ascii", "replace").upper()
        route, allowed = self._resolve(method, path)
        self._last_route = route
        headers = _headers(event)
        _check_framing(head, headers)
        limit = route.max_body_bytes if route is not None else 0
        label = path if route is not None or allowed else "other"
        declared = headers.get("content-length")
        if declared is not None and int(declared) > limit and route is not None:
            raise _RefusedError(413, f"body of {declared} bytes is over this endpoint's {limit}", label)
        body = b""
        has_body = declared not in {None, "0"} or "transfer-encoding" in headers
        if route is not None or not has_body:  # no route: answer at once, never read a body
            if has_body and self._h11.they_are_waiting_for_100_continue:
                self._writer.write(self._h11.send(h11.InformationalResponse(status_code=100, headers=[])))
            body = await self._read_body(limit, deadline, label)
        request = Request(
            method=method,
            path=path,
            query=parse_qs(url.query),
            headers=headers,
            body=body,
            client=self.client,
        )
        response = await self._dispatch(route, allowed, request)
        await self._answer(response, method)
        if response.after is not None:
            self.after(response.after)
        if self._h11.our_state is h11.MUST_CLOSE or self._h11.their_state is not h11.DONE:
            return False
        self._h11.start_next_cycle()
        return True

    async def _read_head(self, *, first: bool) -> tuple[bytes, h11.Request]:
        """Bytes of the head and h11's parse of it, under the head deadline."""
        raw = bytearray(self._h11.trailing_data[0])
        now = self._loop.time()
        started = bool(raw.strip(b"\r\n"))
        head_deadline = now + self._limits.head_seconds
        self._request_deadline = now + self._limits.request_seconds
        wait_deadline = head_deadline if first or started else now + self._limits.idle_seconds
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _RefusedError(exc.error_status_hint, f"bad request: {exc}") from None
            if isinstance(event, h11.Request):
                end = _HEAD_END.search(raw)  # h11 refuses blank lines before the request line
                head = bytes(raw[: end.end()] if end else raw)
                _check_head_size(head, self._limits)
                return head, event
            if isinstance(event, h11.ConnectionClosed):
                raise _DoneError
            _check_head_size(raw, self._limits)
            data = await self._read(wait_deadline)
            if data is None:
                if started:
                    raise _RefusedError(408, "request head not received in time")
                raise _DoneError  # an idle connection is closed without a word
            if not started and data.strip(b"\r\n"):
                started = True
                if not first:
                    now = self._loop.time()
                    self._request_deadline = now + self._limits.request_seconds
                    wait_deadline = now + self._limits.head_seconds
            raw += data
            self._h11.receive_data(data)

    async def _read_body(self, limit: int, deadline: float, label: str) -> bytes:
        """The whole body, de-chunked, no larger than `limit`, by `deadline`."""
        body = bytearray()
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _RefusedError(exc.error_status_hint, f"bad request body: {exc}") from None
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise _RefusedError(413, f"body over this endpoint's {limit} bytes", label)
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif event is h11.NEED_DATA:
                data = await self._read(deadline)
                if data is None:
                    raise _RefusedError(408, "request body not received in time")
                self._h11.receive_data(data)
            else:  # ConnectionClosed cannot come mid-body: h11 raises instead
                raise _DoneError

    async def _read(self, deadline: float) -> bytes | None:
        """Up to 64 KiB, b"" at end of stream, None when `deadline` passed first."""
        remaining = deadline - self._loop.time()
        if remaining <= 0:
            return None
        try:
            async with asyncio.timeout_at(deadline):
                return await self._reader.read(_READ_BYTES)
        except TimeoutError:
            return None

    async def _answer(self, response: Response, method: str) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Server", "trainwarden"),
            *response.headers,
        ]
        if self._h11.their_state is not h11.DONE:
            headers.append(("Connection", "close"))  # the rest of its body is never read
        reason = _reason(response.status).encode()
        data = self._h11.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if method != "HEAD" and response.body:
            data += self._h11.send(h11.Data(data=response.body))
        data += self._h11.send(h11.EndOfMessage())
        await self._write(data)

    async def _refuse(self, refusal: _RefusedError) -> None:
        """Answer a request the server will not pass on, count it, and let the caller close."""
        status = refusal.status
        body = f"{status} {_reason(status)}: {refusal.why}\n".encode()
        head = (
            f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: trainwarden\r\n\r\n"
        )
        self._count(refusal.label, status)
        log.debug("http client %s refused with %d: %s", self.client, status, refusal.why)
        with contextlib.suppress(_DoneError, ConnectionError, OSError):
            await self._write(head.encode() + body)

    async def _write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise _DoneError
        self._writer.write(data)
        try:
            async with asyncio.timeout(self._limits.write_seconds):
                await self._writer.drain()
        except TimeoutError:
            log.debug("http client %s did not read its answer in time", self.client)
            raise _DoneError from None


def _headers(event: h11.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _check_framing(head: bytes, headers: dict[str, str]) -> None:
    """Refuse any request two parsers could frame differently (request smuggling)."""
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) > 1:
        raise _RefusedError(400, "Content-Length sent more than once")
    if lengths and b"," in lengths[0]:
        raise _RefusedError(400, "Content-Length with more than one value")
    if lengths and "transfer-encoding" in headers:
        raise _RefusedError(400, "both Content-Length and Transfer-Encoding")


def _check_head_size(raw: bytes | bytearray, limits: HttpLimits) -> None:
    line_end = raw.find(b"\n")
    if (line_end < 0 and len(raw) > limits.max_target_bytes) or line_end > limits.max_target_bytes:
        raise _RefusedError(414, f"request line over {limits.max_target_bytes} bytes")
    if len(raw) > limits.max_head_bytes:
        raise _RefusedError(431, f"request head over {limits.max_head_bytes} bytes")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
