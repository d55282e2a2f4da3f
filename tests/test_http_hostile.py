"""The daemon's HTTP server against the hostile and broken clients of issue 10, one case each."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading

import pytest

from http_support import ECHO_LIMIT, Served, read_all, serve, statuses, trapped_logs
from support import wait_until
from trainwarden.daemon.http import HttpLimits

QUICK = HttpLimits(head_seconds=0.5, request_seconds=1.0, idle_seconds=1.0, write_seconds=1.0)


@pytest.fixture
def served() -> Served:
    with serve(QUICK) as running:
        yield running


def post(body: bytes, *headers: str, path: str = "/echo") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def test_a_non_ascii_digit_content_length_is_a_counted_400(served: Served) -> None:
    """`Content-Length: ²` gets 400 and is counted under handler="invalid", not a traceback."""
    with trapped_logs() as logs:
        answer = served.exchange(post(b"", "Content-Length: ²"))
    assert statuses(answer) == [400]
    assert served.counts()[("invalid", "400")] == 1
    assert served.calls == []
    assert logs.tracebacks() == []


@pytest.mark.parametrize(
    "headers",
    [
        ("Content-Length: 3", "Content-Length: 3"),
        ("Content-Length: 3", "Content-Length: 30"),
        ("Content-Length: 3, 3",),
        ("Content-Length: 3", "Transfer-Encoding: chunked"),
    ],
)
def test_ambiguous_lengths_are_refused_and_nothing_after_them_is_served(
    served: Served, headers: tuple[str, ...]
) -> None:
    """A repeated, conflicting or doubled length is a 400; the bytes after it are never served."""
    smuggled = b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n"
    answer = served.exchange(post(b"abc" + smuggled, *headers))
    assert statuses(answer) == [400]
    assert served.calls == []
    assert served.counts() == {("invalid", "400"): 1}


def test_a_chunked_body_reaches_the_handler_decoded(served: Served) -> None:
    """A chunked POST is de-chunked and handed over whole; the connection stays usable."""
    chunked = b"4\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\n\r\n"
    answer = served.exchange(post(chunked, "Transfer-Encoding: chunked") + post(b"ok", "Content-Length: 2"))
    assert statuses(answer) == [200, 200]
    assert [call.body for call in served.calls] == [b"Wikipedia in \r\n\r\nchunks.", b"ok"]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: test\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
        (b"GET /healthz HTTP/1.1\r\nHost: test\r\nBad Header\r\n\r\n", 400),
    ],
    ids=["unsupported-coding", "long-target", "big-head", "no-host", "tls", "bad-header"],
)
def test_answers_the_server_gives_itself_are_counted_as_invalid(
    served: Served, request_bytes: bytes, status: int
) -> None:
    """Every refusal made before any route is answered with its status and counted under "invalid"."""
    assert statuses(served.exchange(request_bytes)) == [status]
    assert served.counts() == {("invalid", str(status)): 1}


def test_a_half_sent_request_then_close_is_not_processed(served: Served) -> None:
    """A body cut short by the client's close reaches no handler; the 400 for it is counted."""
    answer = served.exchange(post(b"abc", "Content-Length: 10"))
    assert statuses(answer) == [400]
    assert served.calls == []
    assert served.counts() == {("invalid", "400"): 1}


def test_a_half_sent_head_then_close_is_not_processed(served: Served) -> None:
    """A head without its blank line, then a close, is a 400 and never a request."""
    answer = served.exchange(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n")
    assert statuses(answer) == [400]
    assert served.calls == []


def test_a_body_over_the_route_limit_is_413_before_the_handler(served: Served) -> None:
    """Declared or chunked, a body over the route's limit is refused with 413 under the route's label."""
    declared = served.exchange(post(b"a" * (ECHO_LIMIT + 1), f"Content-Length: {ECHO_LIMIT + 1}"))
    chunk = f"{ECHO_LIMIT + 1:x}\r\n".encode() + b"a" * (ECHO_LIMIT + 1) + b"\r\n0\r\n\r\n"
    chunked = served.exchange(post(chunk, "Transfer-Encoding: chunked"))
    assert statuses(declared) == statuses(chunked) == [413]
    assert served.calls == []
    assert served.counts() == {("/echo", "413"): 2}


def test_expect_100_continue_gets_its_interim_answer(served: Served) -> None:
    """A client that waits for 100 Continue gets it, then sends the body and gets its answer."""
    with served.connect() as sock:
        sock.sendall(post(b"", "Content-Length: 5", "Expect: 100-continue"))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert statuses(read_all(sock)) == [200]
    assert served.calls[0].body == b"hello"


def test_methods_are_routed_separately_and_head_has_no_body(served: Served) -> None:
    """GET on a POST route is 405 with Allow; HEAD is answered by the GET route without a body."""
    wrong = served.exchange(b"GET /echo HTTP/1.1\r\nHost: test\r\n\r\n")
    head = served.exchange(b"HEAD /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert statuses(wrong) == [405]
    assert b"\r\nAllow: POST\r\n" in wrong
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    assert b"Content-Length: 3\r\n" in head


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_gone_before_its_answer_leaves_no_traceback(served: Served, how: str) -> None:
    """A client that closes or resets while its answer is being made costs one debug line at most."""
    with trapped_logs() as logs:
        sock = served.connect()
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        assert served.entered.wait(10)
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        served.gate.set()
        wait_until(served.idle, 10, "the server to drop the connection")
        assert served.counts() == {("/slow", "200"): 1}
        assert logs.tracebacks() == []
        assert logs.above_debug() == []
        assert len([r for r in logs.records if r.name.startswith("trainwarden")]) <= 1
    assert statuses(served.exchange(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")) == [200]


def dribble(sock: socket.socket, byte: bytes) -> bytes:
    """Send one byte every 0.1 s until the server answers or closes; return what it sent."""
    sock.settimeout(0.1)
    while True:
        try:
            first = sock.recv(65536)
        except TimeoutError:
            try:
                sock.send(byte)
            except OSError:
                return b""
            continue
        except ConnectionResetError:
            return b""
        sock.settimeout(10)
        return first + read_all(sock) if first else b""


def test_slow_and_idle_clients_are_cut_off_by_the_deadlines(served: Served) -> None:
    """An idle client is closed silently; one dribbling its head or body gets a counted 408 and is closed."""
    idle = served.connect()
    slow_head = served.connect()
    slow_body = served.connect()
    slow_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
    slow_body.sendall(post(b"ab", f"Content-Length: {ECHO_LIMIT}"))
    answers: dict[str, bytes] = {}
    threads = [
        threading.Thread(target=lambda: answers.setdefault("head", dribble(slow_head, b"s"))),
        threading.Thread(target=lambda: answers.setdefault("body", dribble(slow_body, b"b"))),
    ]
    for thread in threads:
        thread.start()
    assert read_all(idle) == b""
    for thread in threads:
        thread.join(30)
    assert statuses(answers["head"]) == [408]
    assert statuses(answers["body"]) == [408]
    assert served.counts() == {("invalid", "408"): 2}
    assert served.calls == []
    for sock in (idle, slow_head, slow_body):
        sock.close()


def test_many_held_clients_hold_no_threads_and_a_scrape_still_answers() -> None:
    """200 connections sending nothing add no thread to the server, and /metrics still answers."""
    # Deadlines longer than the test: with QUICK's 0.5 s the first connections were cut before a
    # loaded machine had opened the last, so "200 held at once" was a race (the old flake).
    with serve(HttpLimits(head_seconds=60.0, request_seconds=60.0, idle_seconds=60.0)) as served:
        before = threading.active_count()
        held = [served.connect() for _ in range(200)]
        try:
            wait_until(lambda: len(served.server._connections) == 200, 30, "200 held connections")
            assert threading.active_count() <= before + QUICK.workers
            assert served.scrape()
        finally:
            for sock in held:
                sock.close()


def test_a_connection_over_the_limit_gets_a_counted_503() -> None:
    """Past max_connections a new client gets a counted 503; the held ones are still served."""
    with serve(HttpLimits(max_connections=2)) as running:
        held = [running.connect() for _ in range(2)]
        wait_until(lambda: len(running.server._connections) == 2, 10, "two held connections")
        assert statuses(running.exchange(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")) == [503]
        assert running.counts() == {("overload", "503"): 1}
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        assert statuses(read_all(held[0])) == [200]
        for sock in held:
            sock.close()


def test_keep_alive_carries_many_requests(served: Served) -> None:
    """A scraper reuses one connection; every request on it is answered and counted."""
    request = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    answer = served.exchange(request * 5)
    assert statuses(answer) == [200] * 5
    assert served.counts() == {("/healthz", "200"): 5}


def test_after_work_runs_once_the_answer_is_out(served: Served) -> None:
    """A route answers 202 at once while its `after` work is still blocked, then the work runs."""
    answer = served.exchange(post(b"{}", "Content-Length: 2", path="/accept"))
    assert statuses(answer) == [202]
    assert not served.after_done.is_set()
    served.gate.set()
    assert served.after_done.wait(10)


def test_the_listen_backlog_holds_a_burst(served: Served) -> None:
    """The listening socket's backlog is at least 1024 (the stdlib server's was 5), as `ss` reports it."""
    listing = subprocess.run(
        ["ss", "-Hltn", f"sport = :{served.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing[0] == "LISTEN"
    assert int(listing[2]) >= 1024


def test_inline_routes_answer_while_every_worker_is_blocked(served: Served) -> None:
    """With all pool workers held by slow handlers, /healthz and /metrics (inline) still answer."""
    blocked = [served.connect() for _ in range(QUICK.workers)]
    for sock in blocked:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
    wait_until(lambda: len(served.calls) == QUICK.workers, 10, "every worker in /slow")
    assert statuses(served.exchange(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")) == [200]
    assert served.scrape()
    served.gate.set()
    for sock in blocked:
        sock.close()
