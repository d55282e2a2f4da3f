"""The scrape lane: a kept-alive scraper is served by its own loop, so a busy main loop never delays it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from http_support import Served, read_all, serve, statuses
from support import wait_until
from trainwarden.daemon.http import HttpLimits
from trainwarden.model import MetricSpec

SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n"
LIMITS = HttpLimits(head_seconds=5.0, request_seconds=5.0, idle_seconds=5.0, write_seconds=5.0)


@pytest.fixture
def served() -> Iterator[Served]:
    with serve(LIMITS) as running:
        yield running


def read_answers(sock: socket.socket, count: int) -> list[int]:
    """Read until `count` complete answers arrived on a kept-alive connection; their statuses."""
    data = b""
    while True:
        found = statuses(data)
        if found is not None and len(found) == count:
            return found
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data[:200]!r}"
        data += chunk


def lane_held(served: Served) -> int:
    lane = served.server._lane
    assert lane is not None
    return lane.held


def test_a_kept_alive_scraper_moves_to_the_lane_and_keeps_being_answered(served: Served) -> None:
    """After its first scrape the connection is served by the lane; later scrapes on it are answered
    and counted, and its close is seen."""
    with served.connect() as sock:
        sock.sendall(SCRAPE)
        assert read_answers(sock, 1) == [200]
        wait_until(lambda: lane_held(served) == 1, 10, "the scraper on the lane")
        for _ in range(3):
            sock.sendall(SCRAPE)
            assert read_answers(sock, 1) == [200]
    wait_until(served.idle, 10, "the lane to finish with the connection")
    assert lane_held(served) == 0
    assert served.counts() == {("/metrics", "200"): 4}


def test_a_scrape_on_the_lane_answers_while_the_main_loop_is_blocked(served: Served) -> None:
    """With the main event loop stuck in a handler, a moved scraper is still answered; new clients wait."""
    scraper = served.connect()
    scraper.sendall(SCRAPE)
    assert read_answers(scraper, 1) == [200]
    wait_until(lambda: lane_held(served) == 1, 10, "the scraper on the lane")
    staller = served.connect()
    staller.sendall(b"GET /stall HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    assert served.stalled.wait(10)
    try:
        scraper.sendall(SCRAPE)
        assert read_answers(scraper, 1) == [200]
        assert not served.stall_gate.is_set()  # the main loop was blocked all the while
    finally:
        served.stall_gate.set()
    assert statuses(read_all(staller)) == [200]
    scraper.close()
    staller.close()


def test_requests_sent_right_after_an_answer_are_not_lost_in_the_move(served: Served) -> None:
    """Requests a scraper sends the moment its first answer is out reach the lane in order, all answered."""
    for _ in range(20):
        with served.connect() as sock:
            sock.sendall(SCRAPE)
            assert read_answers(sock, 1) == [200]
            sock.sendall(SCRAPE + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n" + SCRAPE)
            assert read_answers(sock, 3) == [200, 200, 200]
    wait_until(served.idle, 10, "every connection finished")
    assert served.counts() == {("/metrics", "200"): 60, ("/healthz", "200"): 20}


def read_one_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and the whole body of one answer, read by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(body)} of {length} bytes"
        body += chunk
    assert len(body) == length
    return head, body


def test_a_large_answer_is_delivered_whole_before_and_after_the_move(served: Served) -> None:
    """A megabyte /metrics answer read through a small receive buffer arrives whole on the main loop,
    and again on the lane once the connection moved."""
    spec = MetricSpec("trainwarden_test_padding", "Padding for a large exposition.", labelnames=("i",))
    store = served.server._store
    assert store is not None
    store.replace("padding", [spec.sample(1.0, i=f"{n:06d}-{'x' * 200}") for n in range(5000)], time.time())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", served.port))
    served.opened += 1
    with sock:
        for _ in range(2):
            sock.sendall(SCRAPE)
            head, body = read_one_answer(sock)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert body.count(b"\ntrainwarden_test_padding{") == 5000
        assert lane_held(served) == 1


def test_pipelined_scrapes_stay_on_the_main_loop_and_are_answered_in_order(served: Served) -> None:
    """A connection with requests queued behind its scrape is not moved; every answer comes, in order."""
    answer = served.exchange(SCRAPE * 2 + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert statuses(answer) == [200, 200, 200]
    assert b"ok\n" in answer[-10:]


def test_past_its_capacity_scrapers_stay_on_the_main_loop() -> None:
    """With room for one on the lane, a second kept-alive scraper is served by the main loop."""
    with serve(HttpLimits(lane_connections=1)) as running:
        first, second = running.connect(), running.connect()
        for sock in (first, second):
            sock.sendall(SCRAPE)
            assert read_answers(sock, 1) == [200]
        wait_until(lambda: lane_held(running) == 1, 10, "one scraper on the lane")
        for sock in (first, second):
            sock.sendall(SCRAPE)
            assert read_answers(sock, 1) == [200]
        assert lane_held(running) == 1
        assert len(running.server._connections) == 1
        first.close()
        second.close()


def test_no_lane_when_it_is_turned_off() -> None:
    """`lane_connections = 0` keeps every connection on the main loop, and scrapes still answer."""
    with serve(HttpLimits(lane_connections=0)) as running:
        assert running.server._lane is None
        with running.connect() as sock:
            for _ in range(2):
                sock.sendall(SCRAPE)
                assert read_answers(sock, 1) == [200]
            assert len(running.server._connections) == 1


def test_stopping_the_server_closes_the_lanes_connections(served: Served) -> None:
    """A scraper held on the lane sees its connection closed when the server stops, and the lane's
    thread ends."""
    sock = served.connect()
    sock.sendall(SCRAPE)
    assert read_answers(sock, 1) == [200]
    wait_until(lambda: lane_held(served) == 1, 10, "the scraper on the lane")
    served.server.stop()
    assert read_all(sock) == b""
    assert not any(t.name == "trainwarden-http-lane" for t in threading.enumerate())
    sock.close()
