"""Network interface counters from `/proc/net/dev`: bytes, packets, errors and drops each way.

`/proc/net/dev` shows the interfaces of the daemon's network namespace, so run the daemon in
the host namespace (the shipped unit does). Loopback and container veth pairs are skipped by
`device_exclude`: veth names are random and would make the series unbounded on a node that
runs containers. InfiniBand/RoCE port counters come from the interconnect collector.
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

DEFAULT_EXCLUDE = r"^(lo|veth.*)$"

# Column positions after the interface name (receive 0-7, transmit 8-15).
_COLUMNS = {
    "receive_bytes": 0,
    "receive_packets": 1,
    "receive_errors": 2,
    "receive_drop": 3,
    "transmit_bytes": 8,
    "transmit_packets": 9,
    "transmit_errors": 10,
    "transmit_drop": 11,
}


def _counter(name: str, help_text: str, window: bool = False) -> MetricSpec:
    return MetricSpec(f"trainwarden_host_network_{name}", help_text, MetricKind.COUNTER, ("device",), window)


SPECS: dict[str, MetricSpec] = {
    "receive_bytes": _counter("receive_bytes_total", "Bytes received.", window=True),
    "receive_packets": _counter("receive_packets_total", "Packets received."),
    "receive_errors": _counter("receive_errors_total", "Receive errors (CRC, frame, FIFO...)."),
    "receive_drop": _counter("receive_drop_total", "Received packets dropped."),
    "transmit_bytes": _counter("transmit_bytes_total", "Bytes transmitted.", window=True),
    "transmit_packets": _counter("transmit_packets_total", "Packets transmitted."),
    "transmit_errors": _counter("transmit_errors_total", "Transmit errors."),
    "transmit_drop": _counter("transmit_drop_total", "Transmitted packets dropped."),
}


def parse_net_dev(text: str, exclude: re.Pattern[str] | None = None) -> Parsed[dict[str, dict[str, int]]]:
    """Parse `/proc/net/dev` into interface → {column: value}, skipping the two header lines."""
    interfaces: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if number <= 2 or not line.strip():
            continue
        # Alias names may contain ':' (`ibr10:30:`), counters never do: split at the last one.
        name, sep, rest = line.rpartition(":")
        name = name.strip()
        fields = rest.split()
        if not sep or not name or len(fields) < 16:
            problems.append(f"line {number}: expected 'NAME: 16 counters', got {line.strip()[:80]!r}")
            continue
        if exclude is not None and exclude.search(name):
            continue
        try:
            interfaces[name] = {column: int(fields[index]) for column, index in _COLUMNS.items()}
        except ValueError:
            problems.append(f"line {number}: non-numeric counter for {name}")
    return Parsed(interfaces, tuple(problems))


@dataclass(frozen=True)
class NetdevOptions(DeviceFilterOptions):
    """`device_exclude`: regex (Python `re.search`) of interface names not to export."""

    device_exclude: str = DEFAULT_EXCLUDE


class NetdevCollector(HostCollector):
    """Turns `/proc/net/dev` into per-interface counters."""

    name: ClassVar[str] = "netdev"
    Options: ClassVar[type[CollectorOptions]] = NetdevOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        own = options if isinstance(options, NetdevOptions) else NetdevOptions()
        self._exclude = own.exclude_pattern()
        self._path = context.paths.proc("net", "dev")

    def start(self) -> None:
        """Disable quietly where there is no `/proc/net/dev`."""
        if not self._path.exists():
            raise CollectorUnavailableError(f"{self._path} does not exist")

    def collect(self) -> Iterable[Sample]:
        """Read `/proc/net/dev` once."""
        parsed = parse_net_dev(read_host_file(self._path), self._exclude)
        self.note(self._path, parsed)
        samples: list[Sample] = []
        for device, counters in parsed.value.items():
            labels = (("device", device),)
            samples.extend(sample(SPECS[column], value, labels) for column, value in counters.items())
        return [*samples, self.parse_error_sample()]


COLLECTOR = NetdevCollector
