"""Host memory from `/proc/meminfo`, in bytes.

Exported fields are the ones an on-call of a training node reaches for: available memory (the
OOM killer's distance, windowed for rules), shared memory (PyTorch DataLoader workers pass
batches through /dev/shm), dirty and writeback pages (a checkpoint being flushed), swap, commit,
unreclaimable slab (kernel leaks), huge pages and hardware-corrupted memory (failing DIMMs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import HostCollector, Parsed, read_host_file, sample
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorUnavailableError
from trainwarden.model import MetricSpec, Sample

_UNITS = {"kB": 1024}


def parse_meminfo(text: str, keys: frozenset[str] | None = None) -> Parsed[dict[str, int]]:
    """Parse `/proc/meminfo` into field → value; `kB` values become bytes, unitless ones stay counts.

    With `keys`, only those fields are converted (and checked): a third of the work per read.
    """
    values: dict[str, int] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        key = fields[0][:-1]
        if keys is not None and key not in keys:
            continue
        if not key or fields[0][-1] != ":" or not 2 <= len(fields) <= 3:
            problems.append(f"line {number}: expected 'Key: value [kB]', got {line[:80]!r}")
            continue
        multiplier = 1
        if len(fields) == 3:
            if fields[2] not in _UNITS:
                problems.append(f"line {number}: unknown unit {fields[2]!r} for {key}")
                continue
            multiplier = _UNITS[fields[2]]
        try:
            values[key] = int(fields[1]) * multiplier
        except ValueError:
            problems.append(f"line {number}: non-numeric value for {key}")
    return Parsed(values, tuple(problems))


def _gauge(name: str, help_text: str, window: bool = False) -> MetricSpec:
    return MetricSpec(f"trainwarden_host_{name}", help_text, window=window)


BYTE_FIELDS: tuple[tuple[str, MetricSpec], ...] = (
    ("MemTotal", _gauge("memory_total_bytes", "Usable RAM.")),
    ("MemFree", _gauge("memory_free_bytes", "RAM not used for anything.")),
    (
        "MemAvailable",
        _gauge("memory_available_bytes", "RAM available for new work without swapping.", window=True),
    ),
    ("Buffers", _gauge("memory_buffers_bytes", "Block device buffers.")),
    ("Cached", _gauge("memory_cached_bytes", "Page cache (includes shared memory).")),
    ("Shmem", _gauge("memory_shared_bytes", "Shared memory and tmpfs, including /dev/shm.")),
    ("Dirty", _gauge("memory_dirty_bytes", "Modified pages waiting to be written to disk.")),
    ("Writeback", _gauge("memory_writeback_bytes", "Pages being written to disk now.")),
    ("AnonPages", _gauge("memory_anonymous_bytes", "Anonymous (process heap and stack) pages.")),
    ("SUnreclaim", _gauge("memory_slab_unreclaimable_bytes", "Kernel slab memory that cannot be reclaimed.")),
    ("Committed_AS", _gauge("memory_committed_bytes", "Memory promised to processes.")),
    ("CommitLimit", _gauge("memory_commit_limit_bytes", "Commit limit under strict overcommit.")),
    ("SwapTotal", _gauge("memory_swap_total_bytes", "Swap space.")),
    ("SwapFree", _gauge("memory_swap_free_bytes", "Unused swap space.")),
    ("HardwareCorrupted", _gauge("memory_hardware_corrupted_bytes", "RAM the kernel retired as corrupted.")),
)
HUGEPAGES_TOTAL = _gauge("memory_hugepages_total_bytes", "Memory in the persistent huge page pool.")
HUGEPAGES_FREE = _gauge("memory_hugepages_free_bytes", "Unallocated memory in the huge page pool.")
_WANTED = frozenset(
    {key for key, _spec in BYTE_FIELDS} | {"HugePages_Total", "HugePages_Free", "Hugepagesize"}
)


class MemoryCollector(HostCollector):
    """Turns `/proc/meminfo` into byte gauges."""

    name: ClassVar[str] = "memory"

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._path = context.paths.proc("meminfo")

    def start(self) -> None:
        """Disable quietly where there is no `/proc/meminfo`."""
        if not self._path.exists():
            raise CollectorUnavailableError(f"{self._path} does not exist")

    def collect(self) -> Iterable[Sample]:
        """Read `/proc/meminfo` once."""
        parsed = parse_meminfo(read_host_file(self._path), _WANTED)
        self.note(self._path, parsed)
        info = parsed.value
        samples: list[Sample] = []
        samples.extend(sample(spec, info[key]) for key, spec in BYTE_FIELDS if key in info)
        page_size = info.get("Hugepagesize")
        if page_size is not None:
            for key, spec in (("HugePages_Total", HUGEPAGES_TOTAL), ("HugePages_Free", HUGEPAGES_FREE)):
                if key in info:
                    samples.append(sample(spec, info[key] * page_size))
        return [*samples, self.parse_error_sample()]


COLLECTOR = MemoryCollector
