"""The kernel log (`<devfs>/kmsg`): NVIDIA XID lines and OOM-killer kills.

NVML's event set misses some XIDs (79 "fallen off the bus", 119/120 GSP errors), so the driver's
`NVRM: Xid (PCI:…): N, …` lines are read here and reported to the shared `XidLedger`, which
deduplicates them against NVML events. The device is opened non-blocking and positioned at its
end at start, so a daemon restart never recounts old incidents. `/dev/kmsg` returns one record
per read; a regular file (a captured log in tests) is read line by line from where it ended.

    [collectors.kmsg]
    interval_seconds = 2.0
    max_records_per_run = 20000      # the rest of a burst is read on the next run
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.collectors.recent_owners import RecentOwners
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorError, CollectorUnavailableError
from trainwarden.model import MetricKind, MetricSpec, Sample
from trainwarden.xid_ledger import XidReport, XidSource

log = logging.getLogger(__name__)

RECORDS = MetricSpec(
    "trainwarden_kmsg_records_total", "Kernel log records read since the daemon started.", MetricKind.COUNTER
)
LOST = MetricSpec(
    "trainwarden_kmsg_lost_records_total",
    "Times the kernel ring buffer overwrote records before they were read (EPIPE).",
    MetricKind.COUNTER,
)
PARSE_ERRORS = MetricSpec(
    "trainwarden_kmsg_parse_errors_total",
    "Kernel log records that were not in `PRIO,SEQ,USEC,FLAGS;TEXT` form, or XID lines without a number.",
    MetricKind.COUNTER,
)
OOM_KILLS = MetricSpec(
    "trainwarden_kernel_oom_kills_total",
    "Processes killed by the OOM killer (scope system or cgroup); job/rank set when it was a training rank.",
    MetricKind.COUNTER,
    ("scope", "job", "rank"),
    window=True,
)

_READ_SIZE = 16384  # larger than any kmsg record (the kernel caps them at ~8 KiB)
_MAX_KEPT = 5

_RECORD = re.compile(r"^(\d+),(\d+),(\d+),([^;]*);(.*)$")
_XID = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<pci>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?)\): "
    r"(?P<xid>\d+)?"
)
_XID_START = "NVRM: Xid "
_PID = re.compile(r"\bpid=(\d+)")
_OOM = re.compile(
    r"(?P<scope>Memory cgroup out of memory|Out of memory): Killed process (?P<pid>\d+) \((?P<comm>[^)]*)\)"
)


@dataclass(frozen=True, slots=True)
class KmsgRecord:
    """One kernel log record: syslog priority, sequence number, microseconds since boot, text."""

    priority: int
    sequence: int
    usec: int
    message: str


@dataclass(frozen=True, slots=True)
class XidLine:
    """An `NVRM: Xid` line."""

    pci_bus_id: str
    xid: int
    pid: int | None
    message: str


@dataclass(frozen=True, slots=True)
class OomKill:
    """An OOM-killer kill; `cgroup` when a memory cgroup limit (not the whole host) ran out."""

    pid: int
    command: str
    cgroup: bool


class KmsgParseError(CollectorError):
    """A record or XID line that cannot be understood; counted, never fatal."""


def parse_record(text: str) -> KmsgRecord | None:
    """Parse one `/dev/kmsg` record; None for continuation lines (` KEY=VALUE`) and blank lines."""
    if not text.strip() or text.startswith(" "):
        return None
    # A device read returns the record and its ` KEY=VALUE` dictionary lines; only the first matters.
    match = _RECORD.match(text.split("\n", 1)[0])
    if match is None:
        raise KmsgParseError(f"not a kmsg record: {text[:80]!r}")
    prio_fac, seq, usec, _flags, message = match.groups()
    return KmsgRecord(int(prio_fac) & 7, int(seq), int(usec), message)


def parse_message(message: str) -> XidLine | OomKill | None:
    """What a kernel message means to us, or None when it is neither an XID nor an OOM kill."""
    if _XID_START in message:
        match = _XID.search(message)
        if match is None or match.group("xid") is None:
            raise KmsgParseError(f"XID line without a PCI id or number: {message[:120]!r}")
        pid = _PID.search(message, match.end())
        return XidLine(
            match.group("pci"), int(match.group("xid")), int(pid.group(1)) if pid else None, message
        )
    match = _OOM.search(message)
    if match is not None:
        return OomKill(
            int(match.group("pid")), match.group("comm"), match.group("scope").startswith("Memory cgroup")
        )
    return None


@dataclass(frozen=True)
class KmsgOptions(CollectorOptions):
    """`max_records_per_run` bounds one run's work after a burst (the rest is read next time)."""

    interval_seconds: float = 2.0
    max_records_per_run: int = 20000

    def problems(self) -> list[tuple[str, str]]:
        """At least one record per run."""
        found = super().problems()
        if self.max_records_per_run < 1:
            found.append(("max_records_per_run", "must be >= 1"))
        return found


class KmsgCollector(Collector):
    """Reads new kernel log records each run; XIDs go to the ledger, OOM kills are counted here."""

    name: ClassVar[str] = "kmsg"
    Options: ClassVar[type[CollectorOptions]] = KmsgOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._opts = options if isinstance(options, KmsgOptions) else KmsgOptions()
        self._path = context.paths.dev("kmsg")
        self._fd: int | None = None
        self._is_device = False
        self._partial = b""
        self._records = 0
        self._lost = 0
        self._parse_errors = 0
        self._oom: Counter[tuple[str, str, str]] = Counter()
        self._owners = RecentOwners(context.pid_owners)
        self._recent_problems: list[str] = []

    def start(self) -> None:
        """Open the log non-blocking at its end; unreadable (no permission, absent) disables quietly."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            hint = (
                " (needs root, or CAP_SYSLOG when kernel.dmesg_restrict=1)"
                if exc.errno == errno.EACCES
                else ""
            )
            raise CollectorUnavailableError(
                f"cannot open {self._path}: {exc.strerror}{hint}; kernel XIDs and OOM kills not collected"
            ) from exc
        self._is_device = stat.S_ISCHR(os.fstat(fd).st_mode)
        os.lseek(fd, 0, os.SEEK_END)
        self._fd = fd

    def close(self) -> None:
        """Close the log."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def collect(self) -> Iterable[Sample]:
        """Read every record that arrived since the last run (up to the per-run bound)."""
        self._owners.refresh(self.context.clock())
        for text in self._read_new():
            try:
                record = parse_record(text)
            except KmsgParseError as exc:
                self._records += 1
                self._problem(str(exc))
                continue
            if record is None:
                continue  # a dictionary line of the previous record (file mode)
            self._records += 1
            try:
                self._handle(parse_message(record.message))
            except KmsgParseError as exc:
                self._problem(str(exc))
        out = [
            RECORDS.sample(self._records),
            LOST.sample(self._lost),
            PARSE_ERRORS.sample(self._parse_errors),
        ]
        out.extend(
            OOM_KILLS.sample(n, scope=scope, job=job, rank=rank)
            for (scope, job, rank), n in sorted(self._oom.items())
        )
        return out

    def _handle(self, event: XidLine | OomKill | None) -> None:
        now = self.context.clock()
        if isinstance(event, XidLine):
            self.context.xid_ledger.record(
                XidReport(
                    XidSource.KMSG,
                    event.xid,
                    now,
                    pci_bus_id=event.pci_bus_id,
                    pid=event.pid,
                    message=event.message,
                )
            )
        elif isinstance(event, OomKill):
            owner = self._owners.get(event.pid)  # the rank may already have been forgotten
            job, rank = (owner.job, str(owner.rank)) if owner is not None else ("", "")
            self._oom[("cgroup" if event.cgroup else "system", job, rank)] += 1
            log.warning(
                "OOM killer killed pid %d (%s)%s",
                event.pid,
                event.command,
                f", rank {rank} of job {job}" if owner else "",
            )

    def _problem(self, text: str) -> None:
        self._parse_errors += 1
        if self._parse_errors == 1:
            log.warning("kmsg: %s (further malformed records are only counted)", text)
        self._recent_problems = [*self._recent_problems, text][-_MAX_KEPT:]

    def _read_new(self) -> Iterator[str]:
        if self._fd is None:
            raise CollectorError(f"{self._path} is not open")
        limit = self._opts.max_records_per_run
        if self._is_device:
            yield from self._read_device(self._fd, limit)
        else:
            yield from self._read_file(self._fd, limit)

    def _read_device(self, fd: int, limit: int) -> Iterator[str]:
        for _ in range(limit):
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            except BrokenPipeError:
                self._lost += 1  # records overwritten; the next read continues with the oldest left
                continue
            except OSError as exc:
                raise CollectorError(f"cannot read {self._path}: {exc.strerror}") from exc
            if not data:
                return
            yield data.decode("utf-8", "replace")

    def _read_file(self, fd: int, limit: int) -> Iterator[str]:
        count = 0
        while count < limit:
            data = os.read(fd, _READ_SIZE)
            if not data:
                return
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                count += 1
                yield line.decode("utf-8", "replace")

    def status(self) -> Mapping[str, Any]:
        """Counts and the latest malformed records."""
        return {
            "records": self._records,
            "lost": self._lost,
            "parse_errors": self._parse_errors,
            "recent_problems": list(self._recent_problems),
        }


COLLECTOR = KmsgCollector
