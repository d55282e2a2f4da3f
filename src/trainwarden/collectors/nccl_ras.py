"""NCCL's RAS service: dead or unresponsive peers, failed ranks, and ranks stuck behind in collectives.

Since NCCL 2.24 every NCCL process runs a RAS thread; the local one listens on `localhost:28028`
(`NCCL_RAS_ADDR`). This collector speaks the same line protocol as NCCL's `ncclras` client
(`CLIENT PROTOCOL 2` → `SERVER PROTOCOL n`, `TIMEOUT s` → `OK`, `SET FORMAT json` → `OK`,
`STATUS` → a JSON document, then EOF) and turns the document into a handful of node-level gauges.
Communicator hashes, hosts and pids are never labels; they go to `status()` for the on-call.
NCCL versions without JSON output answer `SET FORMAT` with an error: counted, nothing exported.
Disabled by default: a STATUS query runs a collective across the job's RAS threads.

    [collectors.nccl_ras]
    enabled = true
    interval_seconds = 30.0
    address = "localhost:28028"      # the jobs' NCCL_RAS_ADDR
    query_timeout_seconds = 5
"""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.config import CollectorOptions, parse_listen
from trainwarden.errors import CollectorError
from trainwarden.model import MetricKind, MetricSpec, Sample

log = logging.getLogger(__name__)

PROTOCOL = 2
_EXTRA_SECONDS = 6.0  # NCCL's own extra timeout (5 s) plus the client's 1 s increment, as `ncclras` allows
_MAX_DOCUMENT = 64 << 20
_G = MetricKind.GAUGE

REACHABLE = MetricSpec(
    "trainwarden_nccl_ras_reachable", "1 when a local NCCL process's RAS service answered the last query."
)
COMMUNICATORS = MetricSpec("trainwarden_nccl_ras_communicators", "Communicators the RAS query reported.")
INCOMPLETE = MetricSpec(
    "trainwarden_nccl_ras_incomplete_communicators",
    "Communicators with ranks that did not answer the RAS query.",
    window=True,
)
MISSING_RANKS = MetricSpec(
    "trainwarden_nccl_ras_missing_ranks",
    "Ranks missing from the RAS answer, by state: dead (its RAS thread is considered dead), "
    "unresponsive (alive but did not answer), missing (no reason given).",
    _G,
    ("state",),
    window=True,
)
RANKS_IN_ERROR = MetricSpec(
    "trainwarden_nccl_ras_ranks_in_error",
    "Ranks reporting an asynchronous NCCL error or an aborted communicator.",
    _G,
    ("kind",),
    window=True,
)
LAGGING = MetricSpec(
    "trainwarden_nccl_ras_lagging_communicators",
    "Communicators whose ranks disagree on how many collectives of some kind they issued (a rank is stuck).",
    window=True,
)
MAX_LAG = MetricSpec(
    "trainwarden_nccl_ras_max_collective_lag",
    "Largest difference, over communicators and collective kinds, between the most and least advanced rank.",
    window=True,
)
QUERY_SECONDS = MetricSpec(
    "trainwarden_nccl_ras_query_seconds", "Time NCCL took to gather the last RAS answer."
)
QUERY_TIMEOUTS = MetricSpec(
    "trainwarden_nccl_ras_query_timeouts", "Legs of the last RAS query that timed out inside NCCL."
)
QUERY_ERRORS = MetricSpec(
    "trainwarden_nccl_ras_query_errors_total",
    "RAS queries that failed after connecting: timeout, protocol, format_unsupported, bad_document.",
    MetricKind.COUNTER,
    ("error",),
)


class RasQueryError(CollectorError):
    """A RAS exchange that went wrong after the connection was made; `kind` is the metric label."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class RasSummary:
    """What one STATUS document says, reduced to bounded numbers plus details for `status()`."""

    communicators: int
    incomplete: int
    missing: Mapping[str, int]
    in_error: Mapping[str, int]
    lagging: int
    max_lag: int
    query_seconds: float
    timeouts: int
    details: tuple[str, ...] = ()


def summarize(document: Any) -> RasSummary:  # noqa: C901 - one pass over a nested document
    """Reduce NCCL's RAS JSON status (communicators → ranks, missing_ranks) to a summary."""
    if not isinstance(document, dict) or not isinstance(document.get("communicators"), list):
        raise RasQueryError("bad_document", "RAS status is not an object with a communicators list")
    missing: Counter[str] = Counter({"dead": 0, "unresponsive": 0, "missing": 0})
    in_error: Counter[str] = Counter({"async_error": 0, "abort": 0})
    incomplete = lagging = max_lag = 0
    details: list[str] = []
    for comm in document["communicators"]:
        if not isinstance(comm, dict):
            raise RasQueryError("bad_document", "a communicator entry is not an object")
        name = str(comm.get("hash", "?"))
        gone = comm.get("missing_ranks") or []
        if gone:
            incomplete += 1
        for rank in gone:
            status = rank.get("status", {}) if isinstance(rank, dict) else {}
            state = (
                "dead"
                if status.get("considered_dead")
                else "unresponsive"
                if status.get("unresponsive")
                else "missing"
            )
            missing[state] += 1
            details.append(
                f"comm {name}: rank {rank.get('rank')} on {rank.get('host')} pid {rank.get('pid')} {state}"
            )
        counts_by_op: dict[str, list[int]] = {}
        for rank in comm.get("ranks") or []:
            if not isinstance(rank, dict):
                continue
            status = rank.get("status") or {}
            if status.get("async_error"):
                in_error["async_error"] += 1
                details.append(
                    f"comm {name}: rank {rank.get('rank')} async error {status.get('async_error')}"
                )
            if status.get("abort_flag"):
                in_error["abort"] += 1
            for op, count in (rank.get("collective_counts") or {}).items():
                if isinstance(count, int):
                    counts_by_op.setdefault(str(op), []).append(count)
        lag = max((max(c) - min(c) for c in counts_by_op.values() if c), default=0)
        if lag:
            lagging += 1
            details.append(f"comm {name}: ranks differ by {lag} collectives")
        max_lag = max(max_lag, lag)
    footer = document.get("ras")
    ras: dict[str, Any] = footer if isinstance(footer, dict) else {}
    return RasSummary(
        communicators=len(document["communicators"]),
        incomplete=incomplete,
        missing=dict(missing),
        in_error=dict(in_error),
        lagging=lagging,
        max_lag=max_lag,
        query_seconds=float(ras.get("collection_time_sec", 0.0)),
        timeouts=int(ras.get("timeouts_count", 0)),
        details=tuple(details[:50]),
    )


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > 65536:
            raise RasQueryError("protocol", "RAS reply line longer than 64 KiB")
    return data.decode("utf-8", "replace")


def _exchange(sock: socket.socket, command: str, expect: str, kind: str) -> str:
    sock.sendall(command.encode() + b"\n")
    reply = _read_line(sock)
    if not reply:
        raise RasQueryError("protocol", f"RAS closed the connection after {command!r}")
    if not reply.upper().startswith(expect):
        raise RasQueryError(kind, f"RAS answered {command!r} with {reply.strip()[:120]!r}")
    return reply


def query_status(
    host: str,
    port: int,
    query_timeout: int,
    connect_timeout: float = 2.0,
    extra_seconds: float = _EXTRA_SECONDS,
) -> Any:
    """Run one JSON STATUS query; ConnectionRefusedError/OSError means no NCCL job here."""
    with socket.create_connection((host, port), timeout=connect_timeout) as sock:
        try:
            _exchange(sock, f"CLIENT PROTOCOL {PROTOCOL}", "SERVER PROTOCOL ", "protocol")
            _exchange(sock, f"TIMEOUT {query_timeout}", "OK", "protocol")
            _exchange(sock, "SET FORMAT json", "OK", "format_unsupported")
            sock.settimeout(query_timeout + extra_seconds)
            sock.sendall(b"STATUS\n")
            chunks: list[bytes] = []
            size = 0
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > _MAX_DOCUMENT:
                    raise RasQueryError("bad_document", "RAS status larger than 64 MiB")
        except TimeoutError as exc:
            raise RasQueryError("timeout", "RAS did not answer in time") from exc
    try:
        return json.loads(b"".join(chunks))
    except json.JSONDecodeError as exc:
        raise RasQueryError("bad_document", f"RAS status is not JSON: {exc}") from exc


@dataclass(frozen=True)
class NcclRasOptions(CollectorOptions):
    """Options of the RAS collector.

    `address`: the jobs' `NCCL_RAS_ADDR` (default NCCL's); `query_timeout_seconds`: how long NCCL
    may wait for other processes (sent as `TIMEOUT`); the collector's own `timeout_seconds` must
    exceed it by NCCL's extra margin.
    """

    enabled: bool = False
    interval_seconds: float = 30.0
    timeout_seconds: float = 20.0
    address: str = "localhost:28028"
    query_timeout_seconds: int = 5

    def problems(self) -> list[tuple[str, str]]:
        """Address must be HOST:PORT; the query must fit in the collector's timeout."""
        found = super().problems()
        try:
            parse_listen(self.address)
        except ValueError as exc:
            found.append(("address", str(exc)))
        if self.query_timeout_seconds < 1:
            found.append(("query_timeout_seconds", "must be >= 1"))
        elif self.timeout_seconds <= self.query_timeout_seconds + _EXTRA_SECONDS:
            margin = f"{_EXTRA_SECONDS:g}"  # filed under both: either may be the typo
            found.append(("timeout_seconds", f"must exceed query_timeout_seconds + {margin} (NCCL's margin)"))
            found.append(("query_timeout_seconds", f"must be below timeout_seconds - {margin}"))
        return found


class NcclRasCollector(Collector):
    """One RAS STATUS query per run."""

    name: ClassVar[str] = "nccl_ras"
    Options: ClassVar[type[CollectorOptions]] = NcclRasOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._opts = options if isinstance(options, NcclRasOptions) else NcclRasOptions()
        self._host, self._port = parse_listen(self._opts.address)
        self._errors: Counter[str] = Counter()
        self._last: RasSummary | None = None
        self._last_problem = ""

    def collect(self) -> Iterable[Sample]:
        """Query once; no job listening is `reachable 0`, a broken exchange is counted by kind."""
        out: list[Sample] = []
        summary: RasSummary | None = None
        try:
            summary = summarize(query_status(self._host, self._port, self._opts.query_timeout_seconds))
        except RasQueryError as exc:
            self._errors[exc.kind] += 1
            if self._last_problem != exc.kind:
                log.warning("nccl_ras: %s (%s:%d)", exc, self._host, self._port)
            self._last_problem = exc.kind
        except OSError:
            pass  # nothing listens: no NCCL job on this node right now
        self._last = summary
        out.append(REACHABLE.sample(1 if summary is not None else 0))
        out.extend(QUERY_ERRORS.sample(n, error=kind) for kind, n in sorted(self._errors.items()))
        if summary is None:
            return out
        self._last_problem = ""
        out += [
            COMMUNICATORS.sample(summary.communicators),
            INCOMPLETE.sample(summary.incomplete),
            LAGGING.sample(summary.lagging),
            MAX_LAG.sample(summary.max_lag),
            QUERY_SECONDS.sample(summary.query_seconds),
            QUERY_TIMEOUTS.sample(summary.timeouts),
        ]
        out.extend(MISSING_RANKS.sample(n, state=state) for state, n in sorted(summary.missing.items()))
        out.extend(RANKS_IN_ERROR.sample(n, kind=kind) for kind, n in sorted(summary.in_error.items()))
        return out

    def status(self) -> Mapping[str, Any]:
        """Which ranks are missing or behind, by communicator hash, host and pid."""
        return {
            "address": f"{self._host}:{self._port}",
            "errors": dict(self._errors),
            "details": list(self._last.details) if self._last else [],
        }


COLLECTOR = NcclRasCollector
