"""What every host collector shares: reading a procfs file and accounting for malformed lines.

Parsers are pure functions returning a `Parsed` value plus the problems they skipped, so one
garbled line in `/proc/diskstats` costs one device, never the whole collection. The collector
counts those problems in `trainwarden_host_parse_errors_total{collector}` and logs the first
one of a run of bad reads (not every interval), so a persistently odd kernel does not flood
the journal.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorError
from trainwarden.model import Labels, MetricKind, MetricSpec, Sample

T = TypeVar("T")

log = logging.getLogger(__name__)

PARSE_ERRORS = MetricSpec(
    "trainwarden_host_parse_errors_total",
    "Malformed lines or fields a host collector skipped since the daemon started.",
    MetricKind.COUNTER,
    ("collector",),
)

_READ_SIZE = 65536

MAX_KEPT_PROBLEMS = 5
"""How many recent problem descriptions `status()` shows."""


@dataclass(frozen=True, slots=True)
class Parsed(Generic[T]):
    """A parser's result: what could be read, and a description of each line it skipped."""

    value: T
    problems: tuple[str, ...] = ()


def read_host_file(path: Path) -> str:
    """Read a procfs/sysfs file; an unreadable file is a `CollectorError` naming it.

    Plain `os.read` calls: a third cheaper than a text-mode `open()`, which adds up at one read
    per file every interval on every node. procfs may return a page per read, hence the loop.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CollectorError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        chunks = []
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
    except OSError as exc:
        raise CollectorError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", errors="replace")


def sample(spec: MetricSpec, value: float, labels: Labels = ()) -> Sample:
    """A sample built without re-checking label names: the hot-path twin of `MetricSpec.sample`.

    Callers pass label pairs sorted by name and matching `spec.labelnames`; the golden tests
    check every exported sample against its spec.
    """
    return Sample(spec, float(value), labels)


@dataclass(frozen=True)
class DeviceFilterOptions(CollectorOptions):
    """`device_exclude`: regex (Python `re.search`) of device or interface names not to export.

    Collectors override the default with a pattern fitting their source.
    """

    device_exclude: str = ""

    def problems(self) -> list[tuple[str, str]]:
        """The exclude pattern must compile."""
        found = super().problems()
        try:
            re.compile(self.device_exclude)
        except re.error as exc:
            found.append(("device_exclude", f"not a valid regular expression: {exc}"))
        return found

    def exclude_pattern(self) -> re.Pattern[str] | None:
        """The compiled pattern, or None when everything is exported."""
        return re.compile(self.device_exclude) if self.device_exclude else None


class HostCollector(Collector):
    """A collector of host files with parse-error accounting; subclasses call `note()` per parse."""

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._parse_errors = 0
        self._recent: list[str] = []
        self._noisy: set[str] = set()

    def note(self, where: Path | str, parsed: Parsed[Any]) -> None:
        """Count the problems of one parse of `where`; log the first after a clean read of that file."""
        key = str(where)
        if not parsed.problems:
            self._noisy.discard(key)
            return
        self._parse_errors += len(parsed.problems)
        described = [f"{where}: {problem}" for problem in parsed.problems]
        self._recent = (self._recent + described)[-MAX_KEPT_PROBLEMS:]
        if key not in self._noisy:
            self._noisy.add(key)
            log.warning(
                "%s collector skipped %d malformed line(s), first: %s (further ones are only counted in %s)",
                self.name,
                len(described),
                described[0],
                PARSE_ERRORS.name,
            )

    def parse_error_sample(self) -> Sample:
        """The cumulative parse-error counter; append it last, after this collection's parses were noted."""
        return PARSE_ERRORS.sample(self._parse_errors, collector=self.name)

    def status(self) -> Mapping[str, Any]:
        """Parse errors so far and the latest few, so `trainwarden status` can say what was skipped."""
        return {"parse_errors": self._parse_errors, "recent_parse_problems": list(self._recent)}
