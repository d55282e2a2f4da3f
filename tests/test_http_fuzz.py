"""Hostile byte streams against the real HTTP server on loopback: answered or closed, never a traceback.

Seeded and bounded (a few seconds); `TRAINWARDEN_FUZZ_EXAMPLES=5000` runs a longer campaign.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import fuzz
from http_support import read_all, serve, statuses, trapped_logs
from support import wait_until
from trainwarden.daemon.http import HttpLimits

LIMITS = HttpLimits(head_seconds=2.0, request_seconds=3.0, idle_seconds=2.0, write_seconds=2.0)

EOL = st.sampled_from([b"\r\n", b"\n", b"\r", b""])
METHOD = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"get", b"G T", b""])
TARGET = st.sampled_from(
    [b"/metrics", b"/healthz", b"/echo", b"/accept", b"/nope", b"*", b"http://x/metrics", b"/%00", b"/\xff"]
) | st.binary(max_size=30)
VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""])
NAME = st.sampled_from(
    [b"Host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Expect", b"Connection", b"X-A"]
) | st.binary(max_size=12)
VALUE = st.sampled_from(
    [b"0", b"5", b"-1", b"+5", "²".encode(), "٣".encode(), b"5, 5", b"1e3", b" 7 ", b"9" * 25, b"chunked",
     b"gzip, chunked", b"chunked, chunked", b"100-continue", b"close", b"keep-alive", b"test"]
) | st.binary(max_size=20)  # fmt: skip
CHUNKED = st.lists(
    st.tuples(
        st.sampled_from([b"0", b"3", b"a", b"ffffffff", b"-1", b"3;x=y", b"zz"]), st.binary(max_size=12)
    ),
    max_size=4,
).map(lambda chunks: b"".join(size + b"\r\n" + data + b"\r\n" for size, data in chunks))
BODY = st.binary(max_size=64) | CHUNKED


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request assembled from plausible and broken parts."""
    eol = draw(EOL)
    line = draw(METHOD) + b" " + draw(TARGET) + b" " + draw(VERSION)
    headers = draw(st.lists(st.tuples(NAME, VALUE), max_size=6))
    if draw(st.booleans()):
        headers.insert(0, (b"Host", b"test"))
    head = line + eol + b"".join(n + b": " + v + eol for n, v in headers) + eol
    return head + draw(BODY)


STREAMS = st.lists(requests() | st.binary(min_size=1, max_size=200), min_size=1, max_size=3).map(b"".join)


def test_hostile_streams_are_answered_or_closed_and_every_answer_is_counted() -> None:
    """Random hostile streams never raise a traceback, each answer sent is counted, and scrapes still work."""
    with serve(LIMITS) as served, trapped_logs() as logs:
        served.gate.set()  # /slow answers at once

        @fuzz(1 / 2)
        @given(stream=STREAMS, cuts=st.lists(st.integers(1, 300), max_size=3), ending=st.sampled_from(
            ["half-close", "half-close", "close", "reset"]
        ))  # fmt: skip
        def check(stream: bytes, cuts: list[int], ending: str) -> None:
            before = served.total()
            with served.connect() as sock:
                for piece in pieces(stream, cuts):
                    try:
                        sock.sendall(piece)
                    except OSError:  # the server refused and closed already
                        break
                if ending == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    answer = None
                elif ending == "close":
                    answer = None
                else:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                    answer = read_all(sock)
            wait_until(served.idle, 10, "the server to finish the connection")
            if answer is not None:
                codes = statuses(answer)
                assert codes is not None, answer[:300]  # nothing but well-framed answers
                assert served.total() - before == len(codes), (codes, served.counts())

        check()
        assert logs.tracebacks() == []
        assert logs.above_debug() == []
        counted = served.total()
        scraped = served.scrape()
        total = sum(v for (name, _), v in scraped.items() if name == "trainwarden_http_requests_total")
        assert total == counted


def pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    """`stream` cut at the given offsets, so the server sees it in several reads."""
    offsets = sorted({c for c in cuts if c < len(stream)})
    edges = [0, *offsets, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


def test_hostile_streams_after_a_scrape_are_answered_on_the_lane_and_counted() -> None:
    """After a first scrape moves a connection to the scrape lane, random hostile bytes on it are
    answered or closed there: well-framed answers only, each counted, never a traceback."""
    scrape = b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n"
    with serve(LIMITS) as served, trapped_logs() as logs:
        served.gate.set()

        @fuzz(1 / 6)
        @given(stream=STREAMS, cuts=st.lists(st.integers(1, 300), max_size=3))
        def check(stream: bytes, cuts: list[int]) -> None:
            before = served.total()
            with served.connect() as sock:
                sock.sendall(scrape)
                first = b""
                while statuses(first) != [200]:
                    chunk = sock.recv(65536)
                    assert chunk, first[:300]
                    first += chunk
                lane = served.server._lane
                assert lane is not None
                wait_until(lambda: lane.held == 1, 10, "the connection on the scrape lane")
                for piece in pieces(stream, cuts):
                    try:
                        sock.sendall(piece)
                    except OSError:
                        break
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                answer = read_all(sock)
            wait_until(served.idle, 10, "the server to finish the connection")
            codes = statuses(answer)
            assert codes is not None, answer[:300]
            assert served.total() - before == 1 + len(codes), (codes, served.counts())

        check()
        assert logs.tracebacks() == []
        assert logs.above_debug() == []
