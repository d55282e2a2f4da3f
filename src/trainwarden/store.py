"""The only shared state: the latest value of every series plus bounded windows for rules.

Each source (a collector, or the daemon itself) owns the series it last reported: a new report
from that source replaces its previous set, so a disk that disappears stops being exported.
Series whose spec asks for a window also keep a bounded history of (timestamp, value).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from trainwarden.model import Labels, MetricSpec, Sample, SeriesKey


@dataclass(frozen=True, slots=True)
class Point:
    """One stored value with its time."""

    timestamp: float
    value: float


@dataclass(frozen=True, slots=True)
class StoredSeries:
    """The latest value of one series, as the exporter and rules see it."""

    spec: MetricSpec
    name: str
    labels: Labels
    value: float
    timestamp: float


class Store:
    """Thread-safe latest values and windows; readers get snapshots, never live structures."""

    def __init__(self, window_seconds: float = 600.0, max_points: int = 2048) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, dict[SeriesKey, StoredSeries]] = {}
        self._windows: dict[SeriesKey, deque[Point]] = {}
        self._window_seconds = window_seconds
        self._max_points = max_points

    def replace(self, source: str, samples: Iterable[Sample], now: float) -> int:
        """Make `samples` the complete current set of series owned by `source`; return how many."""
        fresh: dict[SeriesKey, StoredSeries] = {}
        with self._lock:
            for sample in samples:
                self._record(sample, now, fresh)
            self._latest[source] = fresh
            self._expire(now)
        return len(fresh)

    def add(self, source: str, samples: Iterable[Sample], now: float) -> None:
        """Add or update series of `source` without dropping the ones not mentioned."""
        with self._lock:
            current = self._latest.setdefault(source, {})
            for sample in samples:
                self._record(sample, now, current)

    def drop_source(self, source: str) -> None:
        """Forget every latest value of a source (e.g. a collector that was disabled)."""
        with self._lock:
            self._latest.pop(source, None)

    def drop_windows(self, **labels: str) -> int:
        """Forget the history of every windowed series carrying all these labels (e.g. a restarted job's).

        Latest values are untouched (their source replaces them); returns how many windows went.
        """
        wanted = set(labels.items())
        with self._lock:
            gone = [key for key in self._windows if wanted <= set(key[1])]
            for key in gone:
                del self._windows[key]
        return len(gone)

    def _record(self, sample: Sample, now: float, into: dict[SeriesKey, StoredSeries]) -> None:
        timestamp = now if sample.timestamp is None else sample.timestamp
        key = sample.key
        into[key] = StoredSeries(sample.spec, key[0], sample.labels, sample.value, timestamp)
        if sample.spec.window:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = deque(maxlen=self._max_points)
            point = Point(timestamp, sample.value)
            # A source re-reporting its latest point (same time and value) must not duplicate it:
            # the training collector emits one point per record, then the latest value again.
            if not window or window[-1] != point:
                window.append(point)

    def _expire(self, now: float) -> None:
        horizon = now - self._window_seconds
        dead = []
        for key, window in self._windows.items():
            while window and window[0].timestamp < horizon:
                window.popleft()
            if not window:
                dead.append(key)
        for key in dead:
            del self._windows[key]

    def latest(self) -> list[StoredSeries]:
        """Snapshot of every current series."""
        with self._lock:
            return [series for by_key in self._latest.values() for series in by_key.values()]

    def latest_by_source(self) -> Mapping[str, list[StoredSeries]]:
        """Snapshot grouped by owning source."""
        with self._lock:
            return {source: list(by_key.values()) for source, by_key in self._latest.items()}

    def value(self, name: str, **labels: str) -> float | None:
        """Latest value of one series, or None."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            for by_key in self._latest.values():
                found = by_key.get(key)
                if found is not None:
                    return found.value
        return None

    def find(self, name: str) -> list[StoredSeries]:
        """Every current series with this sample name."""
        with self._lock:
            return [s for by_key in self._latest.values() for key, s in by_key.items() if key[0] == name]

    def window(self, name: str, labels: Labels, since: float | None = None) -> list[Point]:
        """History of one windowed series (oldest first), optionally only points at or after `since`."""
        with self._lock:
            points = list(self._windows.get((name, labels), ()))
        if since is None:
            return points
        return [p for p in points if p.timestamp >= since]

    def windows(self, name: str) -> Iterator[tuple[Labels, list[Point]]]:
        """Every windowed series with this name and its history."""
        with self._lock:
            items = [(key[1], list(points)) for key, points in self._windows.items() if key[0] == name]
        yield from items
