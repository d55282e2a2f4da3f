"""Host CPU time, context switches, interrupts and runnable/blocked tasks from `/proc/stat`.

CPU seconds are aggregated over all CPUs by default (`cpu="all"`): a 128-core node would
otherwise export over a thousand series for this metric alone. Set `per_cpu = true` when a
single saturated core matters (a data-loader worker pinned to one CPU); the aggregate is then
not exported, so `sum by (mode)` never double counts. Guest time is already part of user and
nice time in the kernel's accounting and is not exported separately.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import HostCollector, Parsed, read_host_file, sample
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorUnavailableError
from trainwarden.model import MetricKind, MetricSpec, Sample

MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
"""Columns of a `cpu` line, in the kernel's order (guest columns are folded into user/nice)."""

AGGREGATE = "all"

CPU_SECONDS = MetricSpec(
    "trainwarden_host_cpu_seconds_total",
    "CPU time spent in each mode; cpu=all sums every CPU unless per_cpu is enabled.",
    MetricKind.COUNTER,
    ("cpu", "mode"),
)
CPUS = MetricSpec("trainwarden_host_cpus", "Number of CPUs listed in /proc/stat (online CPUs).")
CONTEXT_SWITCHES = MetricSpec(
    "trainwarden_host_context_switches_total", "Context switches since boot.", MetricKind.COUNTER
)
INTERRUPTS = MetricSpec(
    "trainwarden_host_interrupts_total", "Interrupts serviced since boot.", MetricKind.COUNTER
)
FORKS = MetricSpec(
    "trainwarden_host_forks_total", "Processes and threads created since boot.", MetricKind.COUNTER
)
PROCS_RUNNING = MetricSpec("trainwarden_host_procs_running", "Tasks currently runnable.")
PROCS_BLOCKED = MetricSpec("trainwarden_host_procs_blocked", "Tasks currently blocked on I/O (D state).")
BOOT_TIME = MetricSpec(
    "trainwarden_host_boot_time_seconds", "Unix time the host booted; a change means the node rebooted."
)


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The parts of `/proc/stat` we export. CPU times are in clock ticks, keyed by cpu id or `all`."""

    cpu_ticks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


_COUNTER_LINES = frozenset({"ctxt", "intr", "btime", "processes", "procs_running", "procs_blocked"})


def parse_stat(text: str) -> Parsed[ProcStat]:
    """Parse `/proc/stat`; a line with too few or non-numeric fields is skipped and reported."""
    result = ProcStat()
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        # `intr` and `softirq` carry one count per IRQ (tens of thousands on a large node):
        # split only as far as needed, and fully only the cpu lines.
        fields = line.split(maxsplit=2)
        if not fields:
            continue
        key = fields[0]
        if key.startswith("cpu"):
            fields = line.split()
            cpu = key[3:] or AGGREGATE
            if cpu != AGGREGATE and not cpu.isdigit():
                problems.append(f"line {number}: unknown cpu {key!r}")
                continue
            # Kernels before 2.6.11 lack steal; before 2.6 only four columns exist.
            if len(fields) < 5:
                problems.append(f"line {number}: {key} has {len(fields) - 1} columns, need at least 4")
                continue
            try:
                ticks = tuple(int(value) for value in fields[1 : 1 + len(MODES)])
            except ValueError:
                problems.append(f"line {number}: non-numeric {key} times")
                continue
            result.cpu_ticks[cpu] = ticks + (0,) * (len(MODES) - len(ticks))
        elif key in _COUNTER_LINES:
            # `intr` is followed by per-IRQ counts; its first number is the total.
            try:
                result.counters[key] = int(fields[1])
            except (IndexError, ValueError):
                problems.append(f"line {number}: {key} has no integer value")
    return Parsed(result, tuple(problems))


@dataclass(frozen=True)
class CpuOptions(CollectorOptions):
    """`per_cpu`: export CPU seconds per CPU instead of one aggregate (8 series per CPU)."""

    per_cpu: bool = False


class CpuCollector(HostCollector):
    """Turns `/proc/stat` into CPU seconds per mode and scheduler counters."""

    name: ClassVar[str] = "cpu"
    Options: ClassVar[type[CollectorOptions]] = CpuOptions

    def __init__(
        self, options: CollectorOptions, context: CollectorContext, *, clock_ticks: int | None = None
    ) -> None:
        super().__init__(options, context)
        self._ticks_per_second = float(clock_ticks or os.sysconf("SC_CLK_TCK"))
        self._path = self.context.paths.proc("stat")

    def start(self) -> None:
        """Disable quietly where there is no `/proc/stat` (not Linux, or procfs not mounted)."""
        if not self._path.exists():
            raise CollectorUnavailableError(f"{self._path} does not exist")

    def collect(self) -> Iterable[Sample]:
        """Read `/proc/stat` once."""
        parsed = parse_stat(read_host_file(self._path))
        self.note(self._path, parsed)
        stat = parsed.value
        per_cpu = isinstance(self.options, CpuOptions) and self.options.per_cpu
        samples: list[Sample] = []
        per_second = self._ticks_per_second
        for cpu, ticks in stat.cpu_ticks.items():
            if (cpu == AGGREGATE) == per_cpu:
                continue
            samples.extend(
                sample(CPU_SECONDS, value / per_second, (("cpu", cpu), ("mode", mode)))
                for mode, value in zip(MODES, ticks, strict=True)
            )
        samples.append(sample(CPUS, sum(1 for cpu in stat.cpu_ticks if cpu != AGGREGATE)))
        counters = stat.counters
        for key, spec in (
            ("ctxt", CONTEXT_SWITCHES),
            ("intr", INTERRUPTS),
            ("processes", FORKS),
            ("procs_running", PROCS_RUNNING),
            ("procs_blocked", PROCS_BLOCKED),
            ("btime", BOOT_TIME),
        ):
            if key in counters:
                samples.append(sample(spec, counters[key]))
        return [*samples, self.parse_error_sample()]


COLLECTOR = CpuCollector
