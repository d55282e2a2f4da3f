"""NCCL collective performance from the NCCL Inspector profiler plugin's output directory.

The plugin (`NCCL_PROFILER_PLUGIN=libnccl-profiler-inspector.so`, `NCCL_INSPECTOR_ENABLE=1`) writes
into `NCCL_INSPECTOR_DUMP_DIR` either JSON records, one per collective per communicator, appended
to `<host>-pid<pid>.log`, or (with `NCCL_INSPECTOR_PROM_DUMP=1`) a Prometheus textfile per GPU,
`nccl_inspector_metrics_<uuid>.prom`, rewritten every dump interval. Both are ingested here into
per-collective bus bandwidth and latency, labelled by the training rank that owns the process
(through `CollectorContext.pid_owners`), never by communicator id or sequence number, so the
series stay bounded. JSON files are tailed from their end at start (history is not recounted).
NCCL's RAS service (dead peers, stuck ranks) is the `nccl_ras` collector.

    [collectors.nccl_inspector]
    enabled = true
    directory = "/var/lib/nccl-inspector"   # the jobs' NCCL_INSPECTOR_DUMP_DIR
    stale_seconds = 300.0
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client.parser import text_string_to_metric_families

from trainwarden.collectors.base import Collector, CollectorContext, RankIdentity
from trainwarden.collectors.recent_owners import RecentOwners
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorError, CollectorUnavailableError
from trainwarden.model import MetricKind, MetricSpec, Sample

log = logging.getLogger(__name__)

LABELS = ("job", "rank", "collective")
_C = MetricKind.COUNTER
_G = MetricKind.GAUGE

COLLECTIVES = MetricSpec(
    "trainwarden_nccl_collectives_total", "Collectives completed (JSON mode).", _C, LABELS
)
COLLECTIVE_BYTES = MetricSpec(
    "trainwarden_nccl_collective_bytes_total",
    "Message bytes of completed collectives (JSON mode).",
    _C,
    LABELS,
)
COLLECTIVE_SECONDS = MetricSpec(
    "trainwarden_nccl_collective_seconds_total",
    "Execution time of completed collectives (JSON mode).",
    _C,
    LABELS,
)
BUS_BANDWIDTH = MetricSpec(
    "trainwarden_nccl_bus_bandwidth_bytes_per_second",
    "Mean bus bandwidth of the collectives seen in the last collection (nccl-tests' busbw).",
    _G,
    LABELS,
    window=True,
)
LATENCY = MetricSpec(
    "trainwarden_nccl_collective_latency_seconds",
    "Mean execution time of the collectives seen in the last collection.",
    _G,
    LABELS,
    window=True,
)
RECORDS = MetricSpec(
    "trainwarden_nccl_inspector_records_total",
    "Inspector records ingested, by format (json, prom).",
    _C,
    ("format",),
)
PARSE_ERRORS = MetricSpec(
    "trainwarden_nccl_inspector_parse_errors_total",
    "Inspector records or files that could not be used, by format.",
    _C,
    ("format",),
)

_COLLECTIVE_NAME = re.compile(r"^[A-Za-z]{1,32}$")
_GPU_DEVICE = re.compile(r"^GPU(\d+)$")
_MAX_PARTIAL = 1 << 20
_MAX_KEPT = 5


@dataclass(frozen=True, slots=True)
class CollectiveRecord:
    """One completed collective: what, how big, how long, at what bus bandwidth; who ran it."""

    collective: str
    message_bytes: int
    seconds: float
    bus_bandwidth: float
    pid: int | None
    comm_rank: int | None


class InspectorRecordError(CollectorError):
    """An Inspector record that lacks a field or has one of the wrong type."""


def parse_json_record(data: Any) -> CollectiveRecord:
    """Validate one Inspector JSON object (format v4: header, metadata, coll_perf)."""
    if not isinstance(data, dict):
        raise InspectorRecordError(f"expected an object, got {type(data).__name__}")
    perf = data.get("coll_perf")
    if not isinstance(perf, dict):
        raise InspectorRecordError("no coll_perf object")
    name = perf.get("coll")
    if not isinstance(name, str) or not _COLLECTIVE_NAME.match(name):
        raise InspectorRecordError(f"coll_perf.coll {name!r} is not a collective name")
    try:
        size = int(perf["coll_msg_size_bytes"])
        exec_us = float(perf["coll_exec_time_us"])
        busbw = float(perf["coll_busbw_gbs"])
    except KeyError as exc:
        raise InspectorRecordError(f"coll_perf lacks {exc.args[0]}") from exc
    except (TypeError, ValueError) as exc:
        raise InspectorRecordError(f"coll_perf has a non-numeric field: {exc}") from exc
    if size < 0 or exec_us < 0 or busbw < 0:
        raise InspectorRecordError("coll_perf has a negative size, time or bandwidth")
    metadata = data.get("metadata")
    header = data.get("header")
    pid = metadata.get("pid") if isinstance(metadata, dict) else None
    rank = header.get("rank") if isinstance(header, dict) else None
    return CollectiveRecord(
        name,
        size,
        exec_us / 1e6,
        busbw * 1e9,  # the Inspector's GB/s are 1e9 bytes/s, like nccl-tests
        int(pid) if isinstance(pid, int) else None,
        int(rank) if isinstance(rank, int) else None,
    )


def split_json_stream(buffer: str) -> tuple[list[Any], list[str], str]:
    """Decode concatenated JSON objects (one per line or pretty-printed) → (objects, problems, rest).

    `rest` is an incomplete trailing object to retry when more data arrives; a corrupt object is
    reported and skipped up to the next line that starts an object.
    """
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    problems: list[str] = []
    pos = 0
    length = len(buffer)
    while True:
        while pos < length and buffer[pos].isspace():
            pos += 1
        if pos >= length:
            return objects, problems, ""
        try:
            obj, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError as exc:
            next_start = buffer.find("\n{", pos + 1)
            if next_start == -1:
                if exc.pos >= length - 1 or "Unterminated" in exc.msg:
                    return objects, problems, buffer[pos:]  # still being written
                problems.append(f"invalid JSON at offset {pos}: {exc.msg}")
                return objects, problems, ""
            problems.append(f"invalid JSON at offset {pos}: {exc.msg}")
            pos = next_start + 1
            continue
        objects.append(obj)
        pos = end


def parse_prom_text(text: str) -> tuple[list[tuple[dict[str, str], str, float]], list[str]]:
    """Samples of the Inspector's textfile: (labels, metric name, value) for the three NCCL metrics."""
    wanted = {"nccl_bus_bandwidth_gbs", "nccl_collective_exec_time_microseconds"}
    out: list[tuple[dict[str, str], str, float]] = []
    try:
        for family in text_string_to_metric_families(text):
            out.extend(
                (dict(sample.labels), sample.name, float(sample.value))
                for sample in family.samples
                if sample.name in wanted
            )
    except ValueError as exc:
        return out, [f"not Prometheus text format: {exc}"]
    return out, []


@dataclass(frozen=True)
class NcclInspectorOptions(CollectorOptions):
    """Options of the Inspector collector.

    `directory`: the jobs' `NCCL_INSPECTOR_DUMP_DIR`; `stale_seconds`: ignore textfiles not
    rewritten for this long, and forget a rank's means after it (the job ended);
    `max_bytes_per_run` bounds one run's reading.
    """

    enabled: bool = False
    directory: Path | None = None
    stale_seconds: float = 300.0
    max_bytes_per_run: int = 64 << 20

    def problems(self) -> list[tuple[str, str]]:
        """An enabled collector needs a directory."""
        found = super().problems()
        if self.enabled and self.directory is None:
            found.append(("directory", "required when enabled (the jobs' NCCL_INSPECTOR_DUMP_DIR)"))
        if self.max_bytes_per_run < 4096:
            found.append(("max_bytes_per_run", "must be >= 4096"))
        return found


@dataclass
class _Tail:
    offset: int
    partial: str = ""


_Key = tuple[str, str, str]


class NcclInspectorCollector(Collector):
    """Tails the Inspector's JSON logs and reads its textfiles, once per run."""

    name: ClassVar[str] = "nccl_inspector"
    Options: ClassVar[type[CollectorOptions]] = NcclInspectorOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._opts = options if isinstance(options, NcclInspectorOptions) else NcclInspectorOptions()
        self._tails: dict[Path, _Tail] = {}
        self._counts: Counter[_Key] = Counter()
        self._bytes: Counter[_Key] = Counter()
        self._seconds: dict[_Key, float] = {}
        self._bandwidth: dict[_Key, float] = {}
        self._latency: dict[_Key, float] = {}
        self._seen: dict[_Key, float] = {}
        self._records: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._recent_problems: list[str] = []
        self._owners = RecentOwners(context.pid_owners)

    def start(self) -> None:
        """Skip what the JSON logs already hold: only collectives from now on are counted."""
        directory = self._opts.directory
        if directory is None:
            raise CollectorUnavailableError("no directory configured ([collectors.nccl_inspector] directory)")
        if directory.is_dir():
            for path in directory.glob("*.log"):
                try:
                    self._tails[path] = _Tail(path.stat().st_size)
                except OSError:
                    continue

    def collect(self) -> Iterable[Sample]:
        """Ingest new JSON records and current textfiles; export counters and this run's means."""
        directory = self._opts.directory
        self._owners.refresh(self.context.clock())
        fresh: dict[_Key, list[CollectiveRecord]] = {}
        prom: dict[_Key, list[tuple[str, float]]] = {}
        if directory is not None and directory.is_dir():
            self._read_json_logs(directory, fresh)
            self._read_textfiles(directory, prom)
        now = self.context.clock()
        for key in (*fresh, *prom):
            self._seen[key] = now
        for key in [k for k, seen in self._seen.items() if now - seen > self._opts.stale_seconds]:
            # The job stopped (or moved): its last means would otherwise stick forever.
            del self._seen[key]
            self._bandwidth.pop(key, None)
            self._latency.pop(key, None)
        for key, records in fresh.items():
            self._bandwidth[key] = sum(r.bus_bandwidth for r in records) / len(records)
            self._latency[key] = sum(r.seconds for r in records) / len(records)
        for key, values in prom.items():
            if key in fresh:
                continue  # the JSON stream is the finer source
            bws = [v for name, v in values if name == "nccl_bus_bandwidth_gbs"]
            lats = [v for name, v in values if name == "nccl_collective_exec_time_microseconds"]
            if bws:
                self._bandwidth[key] = sum(bws) / len(bws) * 1e9
            if lats:
                self._latency[key] = sum(lats) / len(lats) / 1e6
        return self._samples()

    def _samples(self) -> list[Sample]:
        out: list[Sample] = []
        for fmt in ("json", "prom"):
            out.append(RECORDS.sample(self._records[fmt], format=fmt))
            out.append(PARSE_ERRORS.sample(self._errors[fmt], format=fmt))
        for (job, rank, coll), n in sorted(self._counts.items()):
            out.append(COLLECTIVES.sample(n, job=job, rank=rank, collective=coll))
            out.append(
                COLLECTIVE_BYTES.sample(self._bytes[(job, rank, coll)], job=job, rank=rank, collective=coll)
            )
            seconds = self._seconds.get((job, rank, coll), 0.0)
            out.append(COLLECTIVE_SECONDS.sample(seconds, job=job, rank=rank, collective=coll))
        for (job, rank, coll), value in sorted(self._bandwidth.items()):
            out.append(BUS_BANDWIDTH.sample(value, job=job, rank=rank, collective=coll))
        for (job, rank, coll), value in sorted(self._latency.items()):
            out.append(LATENCY.sample(value, job=job, rank=rank, collective=coll))
        return out

    # --- JSON mode ------------------------------------------------------------------------------

    def _read_json_logs(self, directory: Path, fresh: dict[_Key, list[CollectiveRecord]]) -> None:
        budget = self._opts.max_bytes_per_run
        present = set()
        for path in sorted(directory.glob("*.log")):
            present.add(path)
            tail = self._tails.setdefault(path, _Tail(0))
            try:
                size = path.stat().st_size
                if size < tail.offset:  # rewritten from scratch
                    tail.offset, tail.partial = 0, ""
                if size == tail.offset or budget <= 0:
                    continue
                with path.open("rb") as handle:
                    handle.seek(tail.offset)
                    data = handle.read(min(size - tail.offset, budget))
            except OSError as exc:
                self._problem("json", f"{path}: cannot read: {exc.strerror or exc}")
                continue
            budget -= len(data)
            tail.offset += len(data)
            text = tail.partial + data.decode("utf-8", "replace")
            objects, problems, tail.partial = split_json_stream(text)
            if len(tail.partial) > _MAX_PARTIAL:
                problems.append(f"unterminated record longer than {_MAX_PARTIAL} bytes dropped")
                tail.partial = ""
            for problem in problems:
                self._problem("json", f"{path}: {problem}")
            for obj in objects:
                try:
                    record = parse_json_record(obj)
                except InspectorRecordError as exc:
                    self._problem("json", f"{path}: {exc}")
                    continue
                self._records["json"] += 1
                key = self._key(self._owner_by_pid(record.pid), record.collective)
                fresh.setdefault(key, []).append(record)
                self._counts[key] += 1
                self._bytes[key] += record.message_bytes
                self._seconds[key] = self._seconds.get(key, 0.0) + record.seconds
        for gone in set(self._tails) - present:
            del self._tails[gone]

    # --- textfile mode --------------------------------------------------------------------------

    def _read_textfiles(self, directory: Path, prom: dict[_Key, list[tuple[str, float]]]) -> None:
        now = self.context.clock()
        for path in sorted(directory.glob("nccl_inspector_metrics_*.prom")):
            try:
                if now - path.stat().st_mtime > self._opts.stale_seconds:
                    continue
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                self._problem("prom", f"{path}: cannot read: {exc.strerror or exc}")
                continue
            samples, problems = parse_prom_text(text)
            for problem in problems:
                self._problem("prom", f"{path}: {problem}")
            for labels, name, value in samples:
                collective = labels.get("collective", "")
                if not _COLLECTIVE_NAME.match(collective):
                    self._problem("prom", f"{path}: collective label {collective!r} is not a collective name")
                    continue
                self._records["prom"] += 1
                key = self._key(self._owner_by_device(labels.get("gpu_device_id", "")), collective)
                prom.setdefault(key, []).append((name, value))

    # --- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _key(owner: RankIdentity | None, collective: str) -> _Key:
        if owner is None:
            return ("", "", collective)
        return (owner.job, str(owner.rank), collective)

    def _owner_by_pid(self, pid: int | None) -> RankIdentity | None:
        return None if pid is None else self._owners.get(pid)  # records flushed at exit still count

    def _owner_by_device(self, device: str) -> RankIdentity | None:
        """Textfiles name the CUDA device (`GPU4`), not the pid: match the one rank with that local rank."""
        match = _GPU_DEVICE.match(device)
        if match is None:
            return None
        local = int(match.group(1))
        owners = {o for o in self.context.pid_owners.snapshot().values() if o.local_rank == local}
        return owners.pop() if len(owners) == 1 else None

    def _problem(self, fmt: str, text: str) -> None:
        self._errors[fmt] += 1
        if self._errors[fmt] == 1:
            log.warning("nccl_inspector: %s (further problems are only counted)", text)
        self._recent_problems = [*self._recent_problems, text][-_MAX_KEPT:]

    def status(self) -> Mapping[str, Any]:
        """Files followed, records and problems."""
        return {
            "directory": str(self._opts.directory),
            "json_files": len(self._tails),
            "records": dict(self._records),
            "parse_errors": dict(self._errors),
            "recent_problems": list(self._recent_problems),
        }


COLLECTOR = NcclInspectorCollector
