"""Idle, flooding and made-up clients of the training socket cannot starve real ranks."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from training_support import connect, hello, received, rejected, running_collector, send, wait_until
from trainwarden.collectors.training import TrainingCollector
from trainwarden.protocol import Reason


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _closed_by_daemon(sock: socket.socket) -> bool:
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


def _real_client_gets_in(collector: TrainingCollector, job: str = "real") -> bool:
    """One attempt of a real client (hello + step); True once its step was received."""
    before = received(collector)
    try:
        sock = connect(collector)
        send(sock, hello(0, job=job), {"type": "step", "step": 1})
    except OSError:
        return False
    try:
        wait_until(lambda: received(collector) >= before + 2 or _refused(sock), timeout=5.0)
    except AssertionError:
        return False
    return received(collector) >= before + 2


def _refused(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_connections_without_a_hello_are_closed_after_the_hello_timeout(tmp_path: Path) -> None:
    """Connections that never say hello are closed and counted as idle_timeout; the server keeps serving."""
    with running_collector(tmp_path, hello_timeout_seconds=0.2) as collector:
        idle = [connect(collector) for _ in range(5)]
        wait_until(lambda: rejected(collector, Reason.IDLE_TIMEOUT) == 5, what="idle connections closed")
        assert all(_closed_by_daemon(s) for s in idle)
        assert collector.status()["connections"] == 0
        assert _real_client_gets_in(collector)
        for sock in idle:
            sock.close()


def test_silent_connections_are_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    """A connection that said hello and then nothing is closed after idle_timeout_seconds, and counted."""
    with running_collector(tmp_path, idle_timeout_seconds=0.3) as collector:
        sock = connect(collector)
        send(sock, hello(0))
        wait_until(lambda: rejected(collector, Reason.IDLE_TIMEOUT) == 1, what="silent connection closed")
        assert _closed_by_daemon(sock)
        assert collector.status()["ranks"][0]["connected"] is False
        sock.close()


def test_a_full_house_of_idle_connections_makes_room_for_a_real_client(tmp_path: Path) -> None:
    """With every slot held by idle connections, a real client evicts the least recently active one."""
    with running_collector(tmp_path, max_connections=8, hello_timeout_seconds=3600.0) as collector:
        idle = [connect(collector) for _ in range(8)]
        wait_until(lambda: collector.status()["connections"] == 8)
        wait_until(lambda: _real_client_gets_in(collector), timeout=30.0, what="a real client admitted")
        assert rejected(collector, Reason.EVICTED) >= 1
        assert collector.status()["connections"] <= 8
        for sock in idle:
            sock.close()


def test_connections_per_uid_are_capped(tmp_path: Path) -> None:
    """Fresh connections beyond max_connections_per_uid are refused even below max_connections."""
    with running_collector(tmp_path, max_connections=100, max_connections_per_uid=3) as collector:
        socks = [connect(collector) for _ in range(5)]
        wait_until(lambda: rejected(collector, Reason.CONNECTION_LIMIT) == 2)
        assert collector.status()["connections"] == 3
        for sock in socks:
            sock.close()


def test_made_up_jobs_cannot_lock_a_real_job_out_of_the_rank_table(tmp_path: Path) -> None:
    """Hellos with made-up jobs fill the table; once they go quiet, a new real job's hello evicts them."""
    clock = FakeClock()
    with running_collector(tmp_path, clock=clock, max_ranks=5, hello_timeout_seconds=10.0) as collector:
        fakes = []
        for i in range(5):
            sock = connect(collector)
            send(sock, hello(0, job=f"made-up-{i}"))
            fakes.append(sock)
        wait_until(lambda: len(collector.status()["ranks"]) == 5)
        assert not _real_client_gets_in(collector, job="early")
        assert rejected(collector, Reason.RANK_LIMIT) == 1
        clock.now += 11.0  # the made-up entries never reported a step within the hello timeout
        assert _real_client_gets_in(collector, job="real")
        jobs = {r["job"] for r in collector.status()["ranks"]}
        assert "real" in jobs
        assert len(jobs) == 5
        assert rejected(collector, Reason.EVICTED) == 1
        assert sum(_refused(s) for s in fakes) == 1, "the evicted entry's connection is closed"
        for sock in fakes:
            with contextlib.suppress(OSError):
                sock.close()


def test_active_real_ranks_are_never_evicted(tmp_path: Path) -> None:
    """A table full of ranks that report steps refuses a newcomer (rank_limit) rather than evict them."""
    clock = FakeClock()
    with running_collector(tmp_path, clock=clock, max_ranks=3) as collector:
        socks = []
        for rank in range(3):
            sock = connect(collector)
            send(sock, hello(rank), {"type": "step", "step": 1})
            socks.append(sock)
        wait_until(lambda: received(collector) == 6)
        clock.now += 30.0  # within evict_idle_seconds
        assert not _real_client_gets_in(collector, job="newcomer")
        assert rejected(collector, Reason.RANK_LIMIT) == 1
        assert rejected(collector, Reason.EVICTED) == 0
        assert {r["job"] for r in collector.status()["ranks"]} == {"toy"}
        for sock in socks:
            sock.close()
