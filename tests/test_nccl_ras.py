"""The NCCL RAS collector against a loopback server speaking NCCL's RAS client protocol."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from gpu_support import FIXTURES, collect_into
from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.nccl_ras import (
    NcclRasCollector,
    NcclRasOptions,
    RasQueryError,
    query_status,
    summarize,
)

DOCS = FIXTURES / "nccl_ras"


@dataclass
class RasServer:
    """What NCCL's RAS thread does for one `ncclras -f json` client (src/ras/client_support.cc)."""

    document: bytes
    json_supported: bool = True
    status_delay: float = 0.0
    commands: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        for raw in reader:
            line = raw.decode().strip()
            self.commands.append(line)
            if line.startswith("CLIENT PROTOCOL"):
                conn.sendall(b"SERVER PROTOCOL 2\n")
            elif line.startswith("TIMEOUT"):
                conn.sendall(b"OK\n")
            elif line == "SET FORMAT json":
                conn.sendall(b"OK\n" if self.json_supported else b"ERROR: Unknown command SET\n")
            elif line == "STATUS":
                time.sleep(self.status_delay)
                conn.sendall(self.document)
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[RasServer]:
    ras = RasServer((DOCS / "status-dead-peer.json").read_bytes())
    yield ras
    ras.close()


def collector(port: int, **options: object) -> NcclRasCollector:
    opts = NcclRasOptions(enabled=True, address=f"127.0.0.1:{port}", **options)  # type: ignore[arg-type]
    return NcclRasCollector(opts, CollectorContext())


def test_dead_peer_and_lagging_rank_are_reported(server: RasServer) -> None:
    """A dead rank, a rank two AllReduces behind and an async error come out as bounded gauges."""
    ras = collector(server.port)
    reg = collect_into(ras)
    assert reg.get_sample_value("trainwarden_nccl_ras_reachable", {}) == 1
    assert reg.get_sample_value("trainwarden_nccl_ras_communicators", {}) == 2
    assert reg.get_sample_value("trainwarden_nccl_ras_incomplete_communicators", {}) == 1
    assert reg.get_sample_value("trainwarden_nccl_ras_missing_ranks", {"state": "dead"}) == 1
    assert reg.get_sample_value("trainwarden_nccl_ras_missing_ranks", {"state": "unresponsive"}) == 0
    assert reg.get_sample_value("trainwarden_nccl_ras_ranks_in_error", {"kind": "async_error"}) == 1
    assert reg.get_sample_value("trainwarden_nccl_ras_lagging_communicators", {}) == 1
    assert reg.get_sample_value("trainwarden_nccl_ras_max_collective_lag", {}) == 2
    assert reg.get_sample_value("trainwarden_nccl_ras_query_timeouts", {}) == 1
    details = ras.status()["details"]
    assert "comm 0x9f3c2a1b4d5e6f70: rank 11 on 10.0.0.2 pid 41004 dead" in details
    assert server.commands == ["CLIENT PROTOCOL 2", "TIMEOUT 5", "SET FORMAT json", "STATUS"]


def test_healthy_job_reads_all_zero() -> None:
    """All ranks present and level: no incomplete or lagging communicator, nothing missing."""
    ras_server = RasServer((DOCS / "status-healthy.json").read_bytes())
    try:
        reg = collect_into(collector(ras_server.port))
    finally:
        ras_server.close()
    assert reg.get_sample_value("trainwarden_nccl_ras_incomplete_communicators", {}) == 0
    assert reg.get_sample_value("trainwarden_nccl_ras_lagging_communicators", {}) == 0
    for state in ("dead", "unresponsive", "missing"):
        assert reg.get_sample_value("trainwarden_nccl_ras_missing_ranks", {"state": state}) == 0


def test_no_job_listening_is_unreachable_not_an_error() -> None:
    """With nothing on the RAS port the collector succeeds with reachable 0 and counts no error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reg = collect_into(collector(port))
    assert reg.get_sample_value("trainwarden_nccl_ras_reachable", {}) == 0
    assert reg.get_sample_value("trainwarden_nccl_ras_communicators", {}) is None


def test_nccl_without_json_output_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    """An older NCCL that rejects SET FORMAT json is counted as format_unsupported and logged once."""
    ras_server = RasServer(b"", json_supported=False)
    ras = collector(ras_server.port)
    try:
        collect_into(ras)
        reg = collect_into(ras)
    finally:
        ras_server.close()
    assert (
        reg.get_sample_value("trainwarden_nccl_ras_query_errors_total", {"error": "format_unsupported"}) == 2
    )
    assert reg.get_sample_value("trainwarden_nccl_ras_reachable", {}) == 0
    assert sum("SET FORMAT json" in r.getMessage() for r in caplog.records) == 1


def test_a_garbled_document_is_counted() -> None:
    """A STATUS answer that is not JSON is counted as bad_document, never raised."""
    ras_server = RasServer(b"Job summary\n===========\n")
    try:
        reg = collect_into(collector(ras_server.port))
    finally:
        ras_server.close()
    assert reg.get_sample_value("trainwarden_nccl_ras_query_errors_total", {"error": "bad_document"}) == 1


def test_a_slow_answer_times_out() -> None:
    """A STATUS answer slower than the query timeout plus the margin is a RasQueryError of kind timeout."""
    ras_server = RasServer(b"{}", status_delay=3.0)
    try:
        with pytest.raises(RasQueryError, match="did not answer in time") as info:
            query_status("127.0.0.1", ras_server.port, 1, extra_seconds=0.2)
    finally:
        ras_server.close()
    assert info.value.kind == "timeout"


@pytest.mark.parametrize(
    ("document", "message"),
    [([], "communicators list"), ({"communicators": [1]}, "not an object")],
)
def test_summarize_rejects_unexpected_shapes(document: object, message: str) -> None:
    """A document without the expected structure is rejected with what is wrong."""
    with pytest.raises(RasQueryError, match=message):
        summarize(document)


def test_options_are_checked() -> None:
    """A bad address and a collector timeout too short for NCCL's query are both reported."""
    problems = dict(NcclRasOptions(address="nowhere", query_timeout_seconds=30).problems())
    assert "address" in problems
    assert "timeout_seconds" in problems
    assert NcclRasOptions().enabled is False
