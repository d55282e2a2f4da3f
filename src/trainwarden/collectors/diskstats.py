"""Block device I/O from `/proc/diskstats`: operations, bytes, time spent and requests in flight.

Partitions, RAM disks, loop devices and floppies are skipped by `device_exclude` (the same
default as node_exporter), so series stay one set per physical or mapped device. Byte and
busy-time counters are windowed: rules use them to tell a slow checkpoint write from a hang.
`/proc/diskstats` always counts 512-byte sectors, whatever the device's sector size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import (
    DeviceFilterOptions,
    HostCollector,
    Parsed,
    read_host_file,
    sample,
)
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorUnavailableError
from trainwarden.model import MetricKind, MetricSpec, Sample

SECTOR_BYTES = 512
DEFAULT_EXCLUDE = r"^(z?ram|loop|fd|sr|(h|s|v|xv)d[a-z]+|nvme\d+n\d+p|mmcblk\d+p)\d+$"


def _counter(name: str, help_text: str, window: bool = False) -> MetricSpec:
    return MetricSpec(f"trainwarden_host_disk_{name}", help_text, MetricKind.COUNTER, ("device",), window)


READS = _counter("reads_completed_total", "Reads completed.")
WRITES = _counter("writes_completed_total", "Writes completed.")
READ_BYTES = _counter("read_bytes_total", "Bytes read.", window=True)
WRITTEN_BYTES = _counter("written_bytes_total", "Bytes written.", window=True)
READ_TIME = _counter("read_time_seconds_total", "Time spent by all reads.")
WRITE_TIME = _counter("write_time_seconds_total", "Time spent by all writes.")
IO_TIME = _counter(
    "io_time_seconds_total", "Time the device had I/O in flight (rate = utilisation).", window=True
)
IO_TIME_WEIGHTED = _counter(
    "io_time_weighted_seconds_total",
    "In-flight time weighted by queue depth (rate = average queue).",
    window=True,
)
IO_NOW = MetricSpec("trainwarden_host_disk_io_now", "I/O requests in flight.", labelnames=("device",))


@dataclass(frozen=True, slots=True)
class DiskStats:
    """One device's counters, converted to bytes and seconds."""

    reads: int
    read_bytes: int
    read_seconds: float
    writes: int
    written_bytes: int
    write_seconds: float
    in_flight: int
    io_seconds: float
    io_weighted_seconds: float


def parse_diskstats(text: str, exclude: re.Pattern[str] | None = None) -> Parsed[dict[str, DiskStats]]:
    """Parse `/proc/diskstats` (11, 15 or 17 stat columns), skipping devices matching `exclude`."""
    devices: dict[str, DiskStats] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 14:
            problems.append(f"line {number}: {len(fields)} fields, need at least 14")
            continue
        name = fields[2]
        if exclude is not None and exclude.search(name):
            continue
        try:
            v = [int(value) for value in fields[3:14]]
        except ValueError:
            problems.append(f"line {number}: non-numeric counter for {name}")
            continue
        devices[name] = DiskStats(
            reads=v[0],
            read_bytes=v[2] * SECTOR_BYTES,
            read_seconds=v[3] / 1000,
            writes=v[4],
            written_bytes=v[6] * SECTOR_BYTES,
            write_seconds=v[7] / 1000,
            in_flight=v[8],
            io_seconds=v[9] / 1000,
            io_weighted_seconds=v[10] / 1000,
        )
    return Parsed(devices, tuple(problems))


@dataclass(frozen=True)
class DiskstatsOptions(DeviceFilterOptions):
    """`device_exclude`: regex (Python `re.search`) of device names not to export."""

    device_exclude: str = DEFAULT_EXCLUDE


class DiskstatsCollector(HostCollector):
    """Turns `/proc/diskstats` into per-device I/O counters."""

    name: ClassVar[str] = "diskstats"
    Options: ClassVar[type[CollectorOptions]] = DiskstatsOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        own = options if isinstance(options, DiskstatsOptions) else DiskstatsOptions()
        self._exclude = own.exclude_pattern()
        self._path = context.paths.proc("diskstats")

    def start(self) -> None:
        """Disable quietly where the kernel exposes no `/proc/diskstats` (some containers)."""
        if not self._path.exists():
            raise CollectorUnavailableError(f"{self._path} does not exist")

    def collect(self) -> Iterable[Sample]:
        """Read `/proc/diskstats` once."""
        parsed = parse_diskstats(read_host_file(self._path), self._exclude)
        self.note(self._path, parsed)
        samples: list[Sample] = []
        for device, s in parsed.value.items():
            labels = (("device", device),)
            samples += [
                sample(READS, s.reads, labels),
                sample(WRITES, s.writes, labels),
                sample(READ_BYTES, s.read_bytes, labels),
                sample(WRITTEN_BYTES, s.written_bytes, labels),
                sample(READ_TIME, s.read_seconds, labels),
                sample(WRITE_TIME, s.write_seconds, labels),
                sample(IO_TIME, s.io_seconds, labels),
                sample(IO_TIME_WEIGHTED, s.io_weighted_seconds, labels),
                sample(IO_NOW, s.in_flight, labels),
            ]
        return [*samples, self.parse_error_sample()]


COLLECTOR = DiskstatsCollector
