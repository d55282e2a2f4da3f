"""InfiniBand and RoCE ports from `<sysfs>/class/infiniband/*/ports/*/`.

Reads each port's state, physical state, rate and link layer, its standard counters (`counters/`;
the data counters count 4-byte words, so they are multiplied by 4 into bytes) and, where the
driver has them (mlx5 RoCE), an allowlist of `hw_counters/` that explain congestion and
retransmission. A host without the class directory exports nothing and stays healthy; the
directory is looked up every run, so a driver loaded later is picked up.

    [collectors.infiniband]
    interval_seconds = 5.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar, TypeVar

from trainwarden.collectors.host_common import HostCollector, Parsed
from trainwarden.collectors.labelled import labelled
from trainwarden.model import MetricKind, MetricSpec, Sample

N = TypeVar("N", int, float)

LABELS = ("device", "port")
_C = MetricKind.COUNTER


def _spec(name: str, help_text: str, kind: MetricKind = _C, window: bool = False) -> MetricSpec:
    return MetricSpec(f"trainwarden_infiniband_port_{name}", help_text, kind, LABELS, window)


STATE = _spec(
    "state", "Logical port state: 1 down, 2 init, 3 armed, 4 active, 5 active-defer.", MetricKind.GAUGE
)
PHYS_STATE = _spec(
    "physical_state",
    "Physical port state: 1 sleep, 2 polling, 3 disabled, 4 port-configuration training, 5 link up, "
    "6 link-error recovery, 7 phy test.",
    MetricKind.GAUGE,
)
UP = _spec("up", "1 when the port is active and its link is up.", MetricKind.GAUGE, window=True)
RATE = _spec("rate_bytes_per_second", "Negotiated link rate.", MetricKind.GAUGE)
INFO = MetricSpec(
    "trainwarden_infiniband_port_info",
    "Link layer of each port (InfiniBand, or Ethernet for RoCE).",
    MetricKind.INFO,
    (*LABELS, "link_layer"),
)
HW_EVENTS = MetricSpec(
    "trainwarden_infiniband_hw_events_total",
    "Selected driver hw_counters by name: RoCE congestion (CNPs, ECN marks), retransmits, sequence errors.",
    MetricKind.COUNTER,
    (*LABELS, "event"),
)

# counters/<file> → (spec, multiplier).
COUNTERS: dict[str, tuple[MetricSpec, int]] = {
    "port_xmit_data": (_spec("transmitted_bytes_total", "Bytes sent (port_xmit_data x 4).", window=True), 4),
    "port_rcv_data": (_spec("received_bytes_total", "Bytes received (port_rcv_data x 4).", window=True), 4),
    "port_xmit_packets": (_spec("transmitted_packets_total", "Packets sent."), 1),
    "port_rcv_packets": (_spec("received_packets_total", "Packets received."), 1),
    "link_downed": (
        _spec("link_downed_total", "Times the link failed error recovery and went down.", window=True),
        1,
    ),
    "link_error_recovery": (_spec("link_error_recovery_total", "Successful link error recoveries."), 1),
    "symbol_error": (_spec("symbol_errors_total", "Minor link errors detected on physical lanes."), 1),
    "port_rcv_errors": (_spec("receive_errors_total", "Received packets with errors."), 1),
    "port_xmit_wait": (
        _spec(
            "transmit_wait_total", "Ticks the port had data to send but no flow-control credits (congestion)."
        ),
        1,
    ),
    "port_xmit_discards": (
        _spec("transmit_discards_total", "Outbound packets discarded (port down or congested)."),
        1,
    ),
    "port_rcv_remote_physical_errors": (
        _spec("receive_remote_physical_errors_total", "Received packets marked bad by the sender (EBP)."),
        1,
    ),
    "local_link_integrity_errors": (
        _spec("local_link_integrity_errors_total", "Times local physical errors exceeded the threshold."),
        1,
    ),
    "excessive_buffer_overrun_errors": (
        _spec("buffer_overrun_errors_total", "Consecutive flow-control update periods with buffer overruns."),
        1,
    ),
}

HW_COUNTERS: frozenset[str] = frozenset(
    {
        "out_of_buffer",
        "out_of_sequence",
        "packet_seq_err",
        "local_ack_timeout_err",
        "rnr_nak_retry_err",
        "implied_nak_seq_err",
        "duplicate_request",
        "req_cqe_error",
        "resp_cqe_error",
        "req_remote_access_errors",
        "resp_local_length_error",
        "rx_icrc_encapsulated",
        "np_cnp_sent",
        "np_ecn_marked_roce_packets",
        "rp_cnp_handled",
        "rp_cnp_ignored",
        "roce_adp_retrans",
        "roce_adp_retrans_to",
        "roce_slow_restart",
        "roce_slow_restart_cnps",
    }
)
"""hw_counters exported (bounded): the ones that explain slow or failing collectives."""

_STATE = re.compile(r"^\s*(\d+)\s*:")
_RATE = re.compile(r"^\s*([\d.]+)\s*Gb/sec")


def parse_state(text: str) -> Parsed[int | None]:
    """`4: ACTIVE` → 4."""
    match = _STATE.match(text)
    if match is None:
        return Parsed(None, (f"expected 'N: NAME', got {text.strip()[:40]!r}",))
    return Parsed(int(match.group(1)))


def parse_rate(text: str) -> Parsed[float | None]:
    """`400 Gb/sec (4X NDR)` → bytes per second."""
    match = _RATE.match(text)
    if match is None:
        return Parsed(None, (f"expected 'N Gb/sec ...', got {text.strip()[:40]!r}",))
    return Parsed(float(match.group(1)) * 1e9 / 8)


def parse_counter(text: str) -> Parsed[int | None]:
    """A decimal counter; `N/A (no PMA)` (counter not implemented) is skipped without a problem."""
    value = text.strip()
    if value.isdigit():
        return Parsed(int(value))
    if value.startswith("N/A"):
        return Parsed(None)
    return Parsed(None, (f"expected a number, got {value[:40]!r}",))


class InfinibandCollector(HostCollector):
    """One pass over every device and port under the infiniband class."""

    name: ClassVar[str] = "infiniband"

    def collect(self) -> Iterable[Sample]:
        """Read every port; a missing class directory means no InfiniBand, so nothing but the error count."""
        root = self.context.paths.sys("class", "infiniband")
        samples = [self.parse_error_sample()]
        if not root.is_dir():
            return samples
        for device_dir in sorted(root.iterdir()):
            ports = device_dir / "ports"
            if not ports.is_dir():
                continue
            for port_dir in sorted(ports.iterdir(), key=lambda p: (len(p.name), p.name)):
                samples.extend(self._port(device_dir.name, port_dir))
        samples[0] = self.parse_error_sample()
        return samples

    def _read(self, path: Path) -> str | None:
        try:
            return path.read_text(encoding="ascii", errors="replace")
        except OSError:
            return None  # a port removed mid-read, or a counter the driver does not have

    def _port(self, device: str, port_dir: Path) -> list[Sample]:
        labels = {"device": device, "port": port_dir.name}
        out = self._states(port_dir, labels)
        link_layer = (self._read(port_dir / "link_layer") or "").strip() or "unknown"
        out.append(labelled(INFO, 1, labels, link_layer=link_layer))
        for filename, (spec, scale) in COUNTERS.items():
            value = self._number(port_dir / "counters" / filename, parse_counter)
            if value is not None:
                out.append(labelled(spec, value * scale, labels))
        hw_dir = port_dir / "hw_counters"
        if hw_dir.is_dir():
            for name in sorted(HW_COUNTERS):
                value = self._number(hw_dir / name, parse_counter)
                if value is not None:
                    out.append(labelled(HW_EVENTS, value, labels, event=name))
        return out

    def _states(self, port_dir: Path, labels: dict[str, str]) -> list[Sample]:
        out: list[Sample] = []
        state = self._number(port_dir / "state", parse_state)
        phys = self._number(port_dir / "phys_state", parse_state)
        if state is not None:
            out.append(labelled(STATE, state, labels))
        if phys is not None:
            out.append(labelled(PHYS_STATE, phys, labels))
        if state is not None or phys is not None:
            out.append(labelled(UP, 1 if state == 4 and phys == 5 else 0, labels))
        rate = self._number(port_dir / "rate", parse_rate)
        if rate is not None:
            out.append(labelled(RATE, rate, labels))
        return out

    def _number(self, path: Path, parse: Callable[[str], Parsed[N | None]]) -> N | None:
        """Read and parse one file; absent is None, malformed is counted and None."""
        text = self._read(path)
        if text is None:
            return None
        parsed = parse(text)
        self.note(path, parsed)
        return parsed.value


COLLECTOR = InfinibandCollector
