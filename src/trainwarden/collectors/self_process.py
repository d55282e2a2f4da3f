"""The daemon's own cost: CPU seconds, memory, open file descriptors and threads.

Read from `<procfs>/self` by default, which is the daemon in the pid namespace of the procfs
it reads: that stays right when a host `/proc` is mounted into a container, where
`os.getpid()` would name another process. Pass `pid` to watch a specific process (tests do,
to pin a fixture). The overhead budget in docs/BENCHMARKS.md is checked against these series.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import HostCollector, Parsed, read_host_file, sample
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorError, CollectorUnavailableError
from trainwarden.model import MetricKind, MetricSpec, Sample

LIMITS_REFRESH_COLLECTIONS = 12
"""Re-read the fd limit this often (once a minute at the default 5 s interval)."""

CPU_SECONDS = MetricSpec(
    "trainwarden_daemon_cpu_seconds_total",
    "CPU time the daemon used, by mode (user, system).",
    MetricKind.COUNTER,
    ("mode",),
)
RESIDENT = MetricSpec("trainwarden_daemon_resident_memory_bytes", "Resident memory of the daemon.")
RESIDENT_PEAK = MetricSpec(
    "trainwarden_daemon_resident_memory_peak_bytes", "Peak resident memory of the daemon."
)
VIRTUAL = MetricSpec("trainwarden_daemon_virtual_memory_bytes", "Virtual memory size of the daemon.")
OPEN_FDS = MetricSpec("trainwarden_daemon_open_fds", "File descriptors the daemon has open.")
MAX_FDS = MetricSpec("trainwarden_daemon_max_fds", "Soft limit on the daemon's open file descriptors.")
THREADS = MetricSpec("trainwarden_daemon_threads", "Threads of the daemon process.")
START_TIME = MetricSpec("trainwarden_daemon_start_time_seconds", "Unix time the daemon process started.")


@dataclass(frozen=True, slots=True)
class ProcessStat:
    """Fields of `/proc/<pid>/stat`; times in clock ticks."""

    utime_ticks: int
    stime_ticks: int
    threads: int
    start_ticks: int


def parse_process_stat(text: str) -> Parsed[ProcessStat | None]:
    """Parse `/proc/<pid>/stat`; the name may hold spaces and parentheses, so split at the last ')'."""
    _head, sep, tail = text.rpartition(")")
    fields = tail.split()
    try:
        if not sep:
            raise ValueError  # noqa: TRY301 - one error path for every malformed file
        # fields[0] is field 3 (state) of proc(5): utime is 14, stime 15, num_threads 20, starttime 22.
        return Parsed(ProcessStat(int(fields[11]), int(fields[12]), int(fields[17]), int(fields[19])))
    except (IndexError, ValueError):
        return Parsed(None, (f"expected 'PID (COMM) STATE ...' with 52 fields, got {text.strip()[:80]!r}",))


_STATUS_KEYS = {"VmRSS": 1024, "VmHWM": 1024, "VmSize": 1024, "Threads": 1}


def parse_process_status(text: str) -> Parsed[dict[str, int]]:
    """Pick VmRSS/VmHWM/VmSize (as bytes) and Threads from `/proc/<pid>/status`; other lines are ignored."""
    values: dict[str, int] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        key, _sep, rest = line.partition(":")
        multiplier = _STATUS_KEYS.get(key)
        if multiplier is None:
            continue
        fields = rest.split()
        try:
            values[key] = int(fields[0]) * multiplier
        except (IndexError, ValueError):
            problems.append(f"line {number}: expected '{key}: N', got {line[:80]!r}")
    return Parsed(values, tuple(problems))


def parse_max_open_files(text: str) -> Parsed[int | None]:
    """Soft limit of 'Max open files' in `/proc/<pid>/limits`; None when unlimited or absent."""
    for line in text.splitlines():
        if line.startswith("Max open files"):
            fields = line[len("Max open files") :].split()
            if fields and fields[0] == "unlimited":
                return Parsed(None)
            try:
                return Parsed(int(fields[0]))
            except (IndexError, ValueError):
                return Parsed(None, (f"expected 'Max open files SOFT HARD files', got {line[:80]!r}",))
    return Parsed(None)


def parse_boot_time(text: str) -> int | None:
    """The `btime` line of `/proc/stat`, needed to turn a start tick into a Unix time."""
    for line in text.splitlines():
        if line.startswith("btime "):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


class SelfProcessCollector(HostCollector):
    """Reports the daemon's own resource use from procfs."""

    name: ClassVar[str] = "self"

    def __init__(
        self,
        options: CollectorOptions,
        context: CollectorContext,
        *,
        pid: int | None = None,
        clock_ticks: int | None = None,
    ) -> None:
        super().__init__(options, context)
        self._dir = context.paths.proc("self" if pid is None else str(pid))
        self._stat = self._dir / "stat"
        self._status = self._dir / "status"
        self._limits = self._dir / "limits"
        self._fd_dir = self._dir / "fd"
        self._ticks_per_second = float(clock_ticks or os.sysconf("SC_CLK_TCK"))
        self._start_time: float | None = None
        self._max_fds: int | None = None
        self._collections = 0

    def start(self) -> None:
        """Disable quietly where procfs has no entry for the process."""
        if not self._stat.exists():
            raise CollectorUnavailableError(f"{self._stat} does not exist")

    def collect(self) -> Iterable[Sample]:
        """Read stat, status, limits and the fd directory of the process."""
        samples: list[Sample] = []
        stat = parse_process_stat(read_host_file(self._stat))
        self.note(self._stat, stat)
        if stat.value is not None:
            per_second = self._ticks_per_second
            samples.append(sample(CPU_SECONDS, stat.value.utime_ticks / per_second, (("mode", "user"),)))
            samples.append(sample(CPU_SECONDS, stat.value.stime_ticks / per_second, (("mode", "system"),)))
            samples.append(sample(THREADS, stat.value.threads))
            start = self._process_start(stat.value.start_ticks)
            if start is not None:
                samples.append(sample(START_TIME, start))
        status = parse_process_status(read_host_file(self._status))
        self.note(self._status, status)
        for key, spec in (("VmRSS", RESIDENT), ("VmHWM", RESIDENT_PEAK), ("VmSize", VIRTUAL)):
            if key in status.value:
                samples.append(sample(spec, status.value[key]))
        # The fd limit almost never changes (prlimit): re-read it once a minute, not every time.
        if self._collections % LIMITS_REFRESH_COLLECTIONS == 0:
            limits = parse_max_open_files(read_host_file(self._limits))
            self.note(self._limits, limits)
            self._max_fds = limits.value
        self._collections += 1
        if self._max_fds is not None:
            samples.append(sample(MAX_FDS, self._max_fds))
        samples.append(sample(OPEN_FDS, self._count_fds()))
        return [*samples, self.parse_error_sample()]

    def _process_start(self, start_ticks: int) -> float | None:
        # The start time never changes: read /proc/stat for btime only once.
        if self._start_time is None:
            try:
                boot = parse_boot_time(read_host_file(self.context.paths.proc("stat")))
            except CollectorError:
                return None
            if boot is not None:
                self._start_time = boot + start_ticks / self._ticks_per_second
        return self._start_time

    def _count_fds(self) -> int:
        try:
            return len(os.listdir(self._fd_dir))  # noqa: PTH208 - no Path object per fd
        except OSError as exc:
            raise CollectorError(f"cannot list {self._fd_dir}: {exc.strerror or exc}") from exc


COLLECTOR = SelfProcessCollector
