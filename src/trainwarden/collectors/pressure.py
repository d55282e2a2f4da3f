"""Pressure stall information (PSI) from `/proc/pressure/{cpu,io,memory}`.

PSI says how much wall time tasks lost waiting for a resource: `some` (at least one task
stalled) and `full` (all non-idle tasks stalled at once). It tells a starved input pipeline
(io, memory) from a slow model far better than utilisation does, so its series are windowed
for the rules. Kernels before 4.20, or booted without PSI (`psi=0`, or CONFIG_PSI_DEFAULT_DISABLED
without `psi=1`), have no `/proc/pressure`: the collector then says so once in the log and in
`status()`, exports `trainwarden_host_pressure_supported 0`, and never fails.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import HostCollector, Parsed, read_host_file, sample
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorError
from trainwarden.model import MetricKind, MetricSpec, Sample

log = logging.getLogger(__name__)

RESOURCES = ("cpu", "io", "memory")
KINDS = ("some", "full")

SUPPORTED = MetricSpec(
    "trainwarden_host_pressure_supported",
    "1 when the kernel exposes pressure stall information (/proc/pressure), else 0.",
)
STALL_RATIO = MetricSpec(
    "trainwarden_host_pressure_stall_ratio",
    "Share of wall time tasks were stalled on the resource over the last 10 s (kernel avg10), 0-1.",
    labelnames=("resource", "kind"),
    window=True,
)
STALL_SECONDS = MetricSpec(
    "trainwarden_host_pressure_stall_seconds_total",
    "Total wall time tasks were stalled on the resource.",
    MetricKind.COUNTER,
    ("resource", "kind"),
    window=True,
)


@dataclass(frozen=True, slots=True)
class Stall:
    """One line of a pressure file: the 10 s average as a ratio and the total in seconds."""

    avg10_ratio: float
    total_seconds: float


def parse_pressure(text: str) -> Parsed[dict[str, Stall]]:
    """Parse `some avg10=0.12 avg60=0.05 avg300=0.01 total=12345` lines into kind → `Stall`."""
    stalls: dict[str, Stall] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        kind = fields[0]
        values = {}
        for field in fields[1:]:
            key, _sep, value = field.partition("=")
            values[key] = value
        try:
            if kind not in KINDS:
                raise KeyError(kind)  # noqa: TRY301 - one error path for every malformed line
            # avg10 is a percentage with two decimals; total is in microseconds.
            stalls[kind] = Stall(float(values["avg10"]) / 100, int(values["total"]) / 1e6)
        except (KeyError, ValueError):
            problems.append(f"line {number}: expected 'some|full avg10=P ... total=US', got {line[:80]!r}")
    return Parsed(stalls, tuple(problems))


class PressureCollector(HostCollector):
    """Turns `/proc/pressure/*` into stall ratios and counters, or a clear 'unsupported'."""

    name: ClassVar[str] = "pressure"

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._unsupported_reason = ""
        self._unreadable: dict[str, str] = {}
        self._directory = context.paths.proc("pressure")
        self._files = [(resource, self._directory / resource) for resource in RESOURCES]

    def collect(self) -> Iterable[Sample]:
        """Read each pressure file; a missing directory or file is reported, never raised."""
        samples: list[Sample] = []
        failures: dict[str, str] = {}
        for resource, path in self._files:
            try:
                text = read_host_file(path)
            except CollectorError as exc:
                # EOPNOTSUPP where PSI is compiled in but disabled; ENOENT on kernels without it.
                failures[resource] = str(exc)
                continue
            parsed = parse_pressure(text)
            self.note(path, parsed)
            for kind, stall in parsed.value.items():
                labels = (("kind", kind), ("resource", resource))
                samples.append(sample(STALL_RATIO, stall.avg10_ratio, labels))
                samples.append(sample(STALL_SECONDS, stall.total_seconds, labels))
        if len(failures) == len(self._files):
            # Only now is the directory worth a stat: to say which of the two cases this is.
            if self._directory.is_dir():
                self._set_unsupported(f"no readable file under {self._directory}")
                self._unreadable = failures
            else:
                reason = f"{self._directory} does not exist (kernel without PSI, or booted with psi=0)"
                self._set_unsupported(reason)
                self._unreadable = {}
            samples.append(sample(SUPPORTED, 0))
            return [*samples, self.parse_error_sample()]
        for resource, why in failures.items():
            if resource not in self._unreadable:
                log.warning("pressure: %s; its series are not exported", why)
        self._unreadable = failures
        self._unsupported_reason = ""
        samples.append(sample(SUPPORTED, 1))
        return [*samples, self.parse_error_sample()]

    def _set_unsupported(self, reason: str) -> None:
        if reason != self._unsupported_reason:
            log.info("pressure stall information unavailable: %s; exporting %s 0", reason, SUPPORTED.name)
        self._unsupported_reason = reason

    def status(self) -> Mapping[str, Any]:
        """Whether PSI is available, and why not."""
        detail = dict(super().status())
        detail["supported"] = not self._unsupported_reason
        if self._unsupported_reason:
            detail["unsupported_reason"] = self._unsupported_reason
        if self._unreadable:
            detail["unreadable"] = dict(self._unreadable)
        return detail


COLLECTOR = PressureCollector
