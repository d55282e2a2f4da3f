"""Exports the last preflight result (`<state_dir>/preflight.json`) from the node daemon.

A preflight is a separate, short process (a Slurm prolog, an init container); the daemon is
what Prometheus scrapes, so it publishes the result: which check last passed or failed, when,
and how long the run took. The file is re-read only when it changes. Labels are bounded by the
checks trainwarden ships: a name in the file that is not one of them is ignored. A damaged file
is counted and logged once per version of it, and exports no result rather than a stale one.

    [collectors.preflight]
    interval_seconds = 5.0
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.config import CollectorOptions
from trainwarden.model import MetricKind, MetricSpec, Sample
from trainwarden.preflight.record import PreflightRecordError, StoredResult, read_result, result_path
from trainwarden.preflight.runner import FAMILIES

log = logging.getLogger(__name__)

LAST_RESULT = MetricSpec(
    "trainwarden_preflight_last_result",
    "Last preflight verdict per check: 1 passed, 0 failed (a skipped check is absent; see _last_checks).",
    labelnames=("check",),
)
LAST_CHECKS = MetricSpec(
    "trainwarden_preflight_last_checks",
    "Checks of the last preflight by result (pass, fail, skipped).",
    labelnames=("result",),
)
LAST_HEALTHY = MetricSpec(
    "trainwarden_preflight_last_healthy", "1 when the last preflight found the node healthy, else 0."
)
LAST_TIME = MetricSpec(
    "trainwarden_preflight_last_run_timestamp_seconds", "Unix time the last preflight finished."
)
LAST_DURATION = MetricSpec(
    "trainwarden_preflight_last_duration_seconds", "Wall time of the last preflight, every check included."
)
RESULT_ERRORS = MetricSpec(
    "trainwarden_preflight_result_errors_total",
    "Times the preflight result file was found damaged or unreadable (each version counted once).",
    MetricKind.COUNTER,
)
KNOWN_CHECKS = frozenset(name for family in FAMILIES for name in family.names)
_RESULTS = ("pass", "fail", "skipped")


class PreflightResultCollector(Collector):
    """Renders the result file; re-reads it only when its size or modification time changed."""

    name: ClassVar[str] = "preflight"

    def __init__(self, options: CollectorOptions, context: CollectorContext) -> None:
        super().__init__(options, context)
        self._path = result_path(context.state_dir)
        self._seen: tuple[int, int, int] | None = None
        self._result: StoredResult | None = None
        self._errors = 0
        self._last_error = ""

    def collect(self) -> Iterable[Sample]:
        """The last result's series (none before the first preflight) and the error counter."""
        self._refresh()
        out = [RESULT_ERRORS.sample(self._errors)]
        result = self._result
        if result is None:
            return out
        counts = dict.fromkeys(_RESULTS, 0)
        for check in result.checks:
            counts[check.status] += 1
            if check.check in KNOWN_CHECKS and check.status != "skipped":
                out.append(LAST_RESULT.sample(1.0 if check.status == "pass" else 0.0, check=check.check))
        out += [LAST_CHECKS.sample(n, result=r) for r, n in counts.items()]
        out += [
            LAST_HEALTHY.sample(1.0 if result.healthy else 0.0),
            LAST_TIME.sample(result.finished_at),
            LAST_DURATION.sample(result.duration_seconds),
        ]
        return out

    def _refresh(self) -> None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._seen, self._result = None, None
            return
        except OSError as exc:
            self._fail(f"{self._path}: {exc.strerror or exc}", None)
            return
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        if version == self._seen:
            return
        try:
            self._result = read_result(self.context.state_dir)
            self._seen, self._last_error = version, ""
        except PreflightRecordError as exc:
            self._fail(str(exc), version)

    def _fail(self, why: str, version: tuple[int, int, int] | None) -> None:
        self._result = None
        if version is None or version != self._seen:
            self._errors += 1
            log.warning("preflight result not exported: %s", why)
        self._seen, self._last_error = version, why

    def status(self) -> Mapping[str, Any]:
        """The file, and why it is not exported when it is damaged."""
        return {"file": str(self._path), "error": self._last_error or None}


COLLECTOR = PreflightResultCollector
