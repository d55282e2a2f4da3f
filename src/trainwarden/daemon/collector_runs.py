"""What the scheduler knows of each collector's runs, and the per-collector series it exports from it.

`trainwarden_collector_success`, `_duration_seconds`, `_runs_total`, `_errors_total`, `_timeouts_total`,
`_skipped_runs_total`, `_series` and `_last_success_timestamp_seconds`, one set per collector (node_exporter's
`node_scrape_collector_*` idea), so a broken source shows on the dashboard instead of as missing data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainwarden.model import Labels, MetricKind, MetricSpec, Sample, labels_of

_L = ("collector",)
SUCCESS = MetricSpec(
    "trainwarden_collector_success",
    "1 if the collector's last run succeeded; 0 if it failed, timed out or its source is unavailable.",
    labelnames=_L,
)
DURATION = MetricSpec(
    "trainwarden_collector_duration_seconds",
    "Wall time of the collector's last run (time until the timeout for a run that hung).",
    labelnames=_L,
)
RUNS = MetricSpec("trainwarden_collector_runs_total", "Collector runs that finished.", MetricKind.COUNTER, _L)
ERRORS = MetricSpec(
    "trainwarden_collector_errors_total",
    "Collector runs that raised an exception.",
    MetricKind.COUNTER,
    _L,
)
TIMEOUTS = MetricSpec(
    "trainwarden_collector_timeouts_total",
    "Collector runs still running after timeout_seconds.",
    MetricKind.COUNTER,
    _L,
)
SKIPPED = MetricSpec(
    "trainwarden_collector_skipped_runs_total",
    "Scheduled runs not started: reason=overlap (previous run still going) or missed (scheduler late).",
    MetricKind.COUNTER,
    ("collector", "reason"),
)
SERIES = MetricSpec(
    "trainwarden_collector_series",
    "Series the collector's last successful run stored (the node's series budget is their sum).",
    labelnames=_L,
)
LAST_SUCCESS = MetricSpec(
    "trainwarden_collector_last_success_timestamp_seconds",
    "Unix time of the collector's last successful run.",
    labelnames=_L,
)
SKIP_REASONS = ("overlap", "missed")


@dataclass
class CollectorState:
    """Book-keeping of one collector; guarded by the scheduler's lock."""

    name: str
    interval: float
    timeout: float
    unavailable: str | None = None
    running_since: float | None = None
    run_seq: int = 0
    timed_out_seq: int = -1
    completed_once: bool = False
    success: bool = False
    duration: float = 0.0
    runs: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    series: int = 0
    last_success: float = 0.0
    last_error: str = ""
    failures_in_a_row: int = 0
    last_logged: float = float("-inf")
    suppressed: int = 0
    _label_cache: Labels | None = None

    def record_error(self, duration: float, error: BaseException) -> None:
        """A run that raised."""
        self.duration = duration
        self.errors += 1
        self.success = False
        self.last_error = f"{type(error).__name__}: {error}"

    def record_success(self, duration: float, stored: int, now: float) -> None:
        """A run that stored its samples; also resets the failure log throttle."""
        self.duration = duration
        self.failures_in_a_row = 0
        self.suppressed = 0
        self.last_logged = float("-inf")
        self.success = True
        self.series = stored
        self.last_success = now
        self.last_error = ""

    def as_status(self) -> dict[str, Any]:
        """JSON-able view for `/status`."""
        if self.unavailable is not None:
            state = "unavailable"
        elif not self.completed_once:
            state = "starting"
        elif self.running_since is not None and self.timed_out_seq == self.run_seq:
            state = "hung"
        else:
            state = "ok" if self.success else "failing"
        return {
            "state": state,
            "interval_seconds": self.interval,
            "timeout_seconds": self.timeout,
            "last_duration_seconds": round(self.duration, 6),
            "last_success_at": self.last_success or None,
            "last_error": self.unavailable or self.last_error or None,
            "runs_total": self.runs,
            "errors_total": self.errors,
            "timeouts_total": self.timeouts,
            "skipped_total": dict(self.skipped),
            "series": self.series,
        }

    def samples(self) -> list[Sample]:
        """Every series the scheduler exports about this collector."""
        out = self.run_samples()
        out.append(Sample(ERRORS, float(self.errors), self._labels()))
        out.append(Sample(TIMEOUTS, float(self.timeouts), self._labels()))
        out.extend(
            Sample(SKIPPED, float(n), labels_of(collector=self.name, reason=r))
            for r, n in self.skipped.items()
        )
        return out

    def run_samples(self) -> list[Sample]:
        """The series every finished run changes (the rest change only on errors, timeouts, skips).

        Built directly rather than through `MetricSpec.sample`: this runs after every collection
        and the labels are known to match.
        """
        labels = self._labels()
        out = [
            Sample(SUCCESS, 1.0 if self.success and self.unavailable is None else 0.0, labels),
            Sample(DURATION, self.duration, labels),
            Sample(RUNS, float(self.runs), labels),
            Sample(SERIES, float(self.series), labels),
        ]
        if self.last_success:
            out.append(Sample(LAST_SUCCESS, self.last_success, labels))
        return out

    def _labels(self) -> Labels:
        if self._label_cache is None:
            self._label_cache = labels_of(collector=self.name)
        return self._label_cache
