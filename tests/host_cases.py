"""Builds every host collector on a fixture host tree (tests/fixtures/hosts/<case>/), as the daemon would."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.collectors.cpu import CpuCollector
from trainwarden.collectors.disk_usage import DiskUsageCollector, DiskUsageOptions, VolumeStat
from trainwarden.collectors.diskstats import DiskstatsCollector
from trainwarden.collectors.load import LoadCollector
from trainwarden.collectors.memory import MemoryCollector
from trainwarden.collectors.netdev import NetdevCollector
from trainwarden.collectors.pressure import PressureCollector
from trainwarden.collectors.self_process import SelfProcessCollector
from trainwarden.paths import HostPaths
from trainwarden.store import Store

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
CLOCK_TICKS = (
    100  # USER_HZ on every Linux architecture we run on; pinned so goldens do not depend on the host
)
NOW = 1_700_000_000.0


def case_dirs() -> list[Path]:
    """Every fixture host tree."""
    return sorted(p for p in HOSTS.iterdir() if (p / "proc").is_dir())


class FixtureProbe:
    """A statvfs probe answering from a case's disk_usage.json; unknown paths do not exist."""

    def __init__(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        self.stats = stats

    def __call__(self, path: str) -> VolumeStat:
        if path not in self.stats:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return VolumeStat(**self.stats[path])


def host_collectors(case: Path) -> Iterator[Collector]:
    """Every host collector, pointed at `case`, with defaults except what the case pins."""
    disk = json.loads((case / "disk_usage.json").read_text())
    context = CollectorContext(
        paths=HostPaths(procfs=case / "proc", sysfs=case / "sys", devfs=case / "dev"),
        state_dir=Path(disk["state_dir"]),
        clock=lambda: NOW,
    )
    volumes = {name: Path(path) for name, path in disk["volumes"].items()}
    yield CpuCollector(CpuCollector.Options(), context, clock_ticks=CLOCK_TICKS)
    yield MemoryCollector(MemoryCollector.Options(), context)
    yield LoadCollector(LoadCollector.Options(), context)
    yield DiskUsageCollector(DiskUsageOptions(volumes=volumes), context, probe=FixtureProbe(disk["stat"]))
    yield DiskstatsCollector(DiskstatsCollector.Options(), context)
    yield NetdevCollector(NetdevCollector.Options(), context)
    yield PressureCollector(PressureCollector.Options(), context)
    yield SelfProcessCollector(SelfProcessCollector.Options(), context, clock_ticks=CLOCK_TICKS)


def collect_case(case: Path) -> Store:
    """Run every host collector once on `case` into a fresh store."""
    store = Store()
    for collector in host_collectors(case):
        collector.start()
        store.replace(collector.name, collector.collect(), NOW)
    return store
