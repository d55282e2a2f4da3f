"""What a collector is: one source turned into `Sample`s, deciding nothing.

A collector is one file that defines a `Collector` subclass (with its own `Options` dataclass
when it has settings) and exposes it as the module-level `COLLECTOR`; registering it is one
line in `trainwarden.collectors.COLLECTOR_MODULES`.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trainwarden.config import CollectorOptions
from trainwarden.model import Sample
from trainwarden.paths import HostPaths
from trainwarden.protocol import Record
from trainwarden.xid_ledger import XidLedger

RecordListener = Callable[[float, str, int, int, Record], None]
"""Told of every client record the training collector applied: (arrival time, job, rank, pid, record)."""


@dataclass(frozen=True, slots=True)
class RankIdentity:
    """Which training rank a process is."""

    job: str
    rank: int
    local_rank: int


class PidOwners:
    """pid → training rank, filled by the training collector, read by others (GPU per-process memory).

    The one piece of state collectors share besides the store; thread-safe and tiny.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[int, RankIdentity] = {}

    def set(self, pid: int, identity: RankIdentity) -> None:
        """Record that `pid` is this rank."""
        with self._lock:
            self._owners[pid] = identity

    def forget(self, pid: int) -> None:
        """Drop a pid that exited."""
        with self._lock:
            self._owners.pop(pid, None)

    def get(self, pid: int) -> RankIdentity | None:
        """The rank owning `pid`, if known."""
        with self._lock:
            return self._owners.get(pid)

    def snapshot(self) -> dict[int, RankIdentity]:
        """Copy of the whole mapping."""
        with self._lock:
            return dict(self._owners)


@dataclass(frozen=True)
class CollectorContext:
    """What the daemon hands every collector: injected paths and directories, a clock, pid owners.

    `xid_ledger` is where the NVML event thread and the kernel-log collector report XIDs, so one
    incident seen by both is counted once.
    """

    paths: HostPaths = field(default_factory=HostPaths)
    runtime_dir: Path = Path("/run/trainwarden")
    state_dir: Path = Path("/var/lib/trainwarden")
    clock: Callable[[], float] = time.time
    pid_owners: PidOwners = field(default_factory=PidOwners)
    xid_ledger: XidLedger = field(default_factory=XidLedger)
    record_listeners: tuple[RecordListener, ...] = ()  # e.g. the goodput accountant


class Collector(abc.ABC):
    """Base of every collector.

    `collect()` runs on a scheduler thread at `options.interval_seconds` and returns the full
    current set of series this collector owns. Long-lived resources (threads, sockets, NVML
    handles) are opened in `start()` and released in `close()`. Raising from `collect()` marks
    the collection failed; `CollectorUnavailableError` from `start()` disables the collector.
    """

    name: ClassVar[str]
    Options: ClassVar[type[CollectorOptions]] = CollectorOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        self.options = options
        self.context = context

    def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Open long-lived resources; default: nothing to open."""

    @abc.abstractmethod
    def collect(self) -> Iterable[Sample]:
        """Read the source once and return its samples."""

    def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release what `start()` opened; default: nothing."""

    def status(self) -> Mapping[str, Any]:
        """Extra JSON-able detail for `/status` (e.g. what was skipped and why)."""
        return {}
