"""One place where XIDs from NVML events and from the kernel log meet and are counted once.

NVML's event set misses some XIDs (79, 119, 120) and the kernel log may be unreadable in a
container, so both sources report here. A report matching an unmatched report of the *other*
source for the same GPU and XID within `dedupe_seconds` is the same incident and is not counted
again; repeats from one source are real repeats and are counted. The ledger is shared through
`CollectorContext.xid_ledger`; only the `xid` collector exports it, so each series has one owner.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter, deque
from dataclasses import dataclass

_DEFAULT_DEDUPE_SECONDS = 30.0
_RECENT = 64


class XidSource(enum.StrEnum):
    """Where an XID report came from."""

    NVML = "nvml"
    KMSG = "kmsg"


@dataclass(frozen=True, slots=True)
class XidReport:
    """One XID as a source saw it; `gpu_index` or `pci_bus_id` (or both) identify the GPU."""

    source: XidSource
    xid: int
    timestamp: float
    gpu_index: int | None = None
    pci_bus_id: str | None = None
    pid: int | None = None
    message: str = ""


def normalize_pci_bus_id(text: str) -> str:
    """`00000000:18:00.0` (NVML) and `0000:18:00` (kernel log) both become `0000:18:00`."""
    parts = text.strip().lower().removeprefix("pci:").split(":")
    if len(parts) == 2:
        parts = ["0000", *parts]
    if len(parts) != 3:
        return text.strip().lower()
    domain, bus, device = parts
    return f"{domain[-4:]:0>4}:{bus:0>2}:{device.split('.')[0]:0>2}"


class XidLedger:
    """Thread-safe dedupe and counting of XID reports (an NVML event thread and a collector both write)."""

    def __init__(self, dedupe_seconds: float = _DEFAULT_DEDUPE_SECONDS) -> None:
        self.dedupe_seconds = dedupe_seconds
        self._lock = threading.Lock()
        self._gpu_by_pci: dict[str, int] = {}
        self._counts: Counter[tuple[str, int]] = Counter()
        self._reports: Counter[XidSource] = Counter()
        self._duplicates = 0
        self._unmatched: dict[tuple[str, int, XidSource], deque[float]] = {}
        self._recent: deque[XidReport] = deque(maxlen=_RECENT)

    def set_gpus(self, pci_to_index: dict[str, int]) -> None:
        """Tell the ledger which PCI bus id is which NVML index (the GPU collector knows)."""
        with self._lock:
            self._gpu_by_pci = {normalize_pci_bus_id(k): v for k, v in pci_to_index.items()}

    def known_gpus(self) -> list[str]:
        """`gpu` labels of every GPU the GPU collector announced, in index order."""
        with self._lock:
            return [str(i) for i in sorted(set(self._gpu_by_pci.values()))]

    def gpu_label(self, report: XidReport) -> str:
        """The `gpu` label: the NVML index when known, else the normalised PCI bus id."""
        with self._lock:
            return self._label(report)

    def _label(self, report: XidReport) -> str:
        if report.gpu_index is not None:
            return str(report.gpu_index)
        if report.pci_bus_id:
            pci = normalize_pci_bus_id(report.pci_bus_id)
            index = self._gpu_by_pci.get(pci)
            return str(index) if index is not None else pci
        return "unknown"

    def record(self, report: XidReport) -> bool:
        """Add one report; True when it counted as a new incident, False when it was a duplicate."""
        with self._lock:
            self._reports[report.source] += 1
            gpu = self._label(report)
            other = XidSource.KMSG if report.source is XidSource.NVML else XidSource.NVML
            theirs = self._unmatched.get((gpu, report.xid, other))
            if theirs is not None:
                while theirs and theirs[0] < report.timestamp - self.dedupe_seconds:
                    theirs.popleft()
                if theirs:
                    theirs.popleft()
                    self._duplicates += 1
                    return False
            mine = self._unmatched.setdefault((gpu, report.xid, report.source), deque(maxlen=_RECENT))
            mine.append(report.timestamp)
            self._counts[(gpu, report.xid)] += 1
            self._recent.append(report)
            return True

    def counts(self) -> dict[tuple[str, int], int]:
        """Incidents counted so far by (gpu label, xid)."""
        with self._lock:
            return dict(self._counts)

    def reports_by_source(self) -> dict[XidSource, int]:
        """Raw reports received per source, before dedupe."""
        with self._lock:
            return dict(self._reports)

    @property
    def duplicates(self) -> int:
        """Reports dropped as the other source's copy of an incident already counted."""
        with self._lock:
            return self._duplicates

    def recent(self) -> list[XidReport]:
        """The last counted incidents, oldest first (for `/status` and incident bundles)."""
        with self._lock:
            return list(self._recent)
