"""Load averages and the number of kernel scheduling entities from `/proc/loadavg`.

The thread count catches DataLoader worker or thread leaks that build up over a long run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import HostCollector, Parsed, read_host_file, sample
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorUnavailableError
from trainwarden.model import MetricSpec, Sample

LOAD1 = MetricSpec("trainwarden_host_load1", "Load average over 1 minute.")
LOAD5 = MetricSpec("trainwarden_host_load5", "Load average over 5 minutes.")
LOAD15 = MetricSpec("trainwarden_host_load15", "Load average over 15 minutes.")
THREADS = MetricSpec(
    "trainwarden_host_threads", "Kernel scheduling entities (processes and threads) on the host."
)


@dataclass(frozen=True, slots=True)
class LoadAvg:
    """`/proc/loadavg`: three averages and the total of scheduling entities."""

    load1: float
    load5: float
    load15: float
    threads: int


def parse_loadavg(text: str) -> Parsed[LoadAvg | None]:
    """Parse `0.52 0.58 0.59 2/1234 56789`; anything else yields None and one problem."""
    fields = text.split()
    if len(fields) >= 4 and "/" in fields[3]:
        try:
            load1, load5, load15 = (float(value) for value in fields[:3])
            return Parsed(LoadAvg(load1, load5, load15, int(fields[3].partition("/")[2])))
        except ValueError:
            pass
    return Parsed(None, (f"expected 'L1 L5 L15 R/T PID', got {text.strip()[:80]!r}",))


class LoadCollector(HostCollector):
    """Turns `/proc/loadavg` into gauges."""

    name: ClassVar[str] = "load"

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._path = context.paths.proc("loadavg")

    def start(self) -> None:
        """Disable quietly where there is no `/proc/loadavg`."""
        if not self._path.exists():
            raise CollectorUnavailableError(f"{self._path} does not exist")

    def collect(self) -> Iterable[Sample]:
        """Read `/proc/loadavg` once."""
        parsed = parse_loadavg(read_host_file(self._path))
        self.note(self._path, parsed)
        samples: list[Sample] = []
        load = parsed.value
        if load is not None:
            samples += [
                sample(LOAD1, load.load1),
                sample(LOAD5, load.load5),
                sample(LOAD15, load.load15),
                sample(THREADS, load.threads),
            ]
        return [*samples, self.parse_error_sample()]


COLLECTOR = LoadCollector
