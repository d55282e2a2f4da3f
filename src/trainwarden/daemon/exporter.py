"""Renders the store at scrape time as a custom prometheus-client collector."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector as PromCollector
from prometheus_client.registry import CollectorRegistry

from trainwarden import __version__
from trainwarden.model import Labels, MetricKind, MetricSpec
from trainwarden.store import Store, StoredSeries


class StoreExporter(PromCollector):
    """Yields one metric family per spec found in the store; nothing is cached between scrapes."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        """Group the store's latest series by spec and emit them."""
        families: dict[str, Metric] = {}
        for series in sorted(self._store.latest(), key=_exposition_order):
            family = families.get(series.spec.name)
            if family is None:
                family = families[series.spec.name] = _family(series.spec)
            family.add_sample(series.name, dict(series.labels), series.value)
        yield build_info_family()
        yield from families.values()


_SUFFIX_ORDER = {"_bucket": 0, "_count": 1, "_sum": 2}


def _exposition_order(series: StoredSeries) -> tuple[str, Labels, int, float]:
    """Family, label set, then a histogram's buckets by numeric `le`, `_count`, `_sum`.

    OpenMetrics wants each label set's samples together and buckets in increasing `le`
    (sorting by sample name and `le` as text broke both); other metrics keep (name, labels).
    """
    le = 0.0
    labels = series.labels
    if series.name.endswith("_bucket"):
        rest = []
        for key, value in series.labels:
            if key == "le":
                try:
                    le = float(value)  # "+Inf" included
                except ValueError:
                    le = math.inf
            else:
                rest.append((key, value))
        labels = tuple(rest)
    suffix = series.name[len(series.spec.name) :]
    return series.spec.name, labels, _SUFFIX_ORDER.get(suffix, 0), le


def _family(spec: MetricSpec) -> Metric:
    name = spec.name
    if spec.kind is MetricKind.COUNTER:
        name = name.removesuffix("_total")
    elif spec.kind is MetricKind.INFO:
        name = name.removesuffix("_info")
    return Metric(name, spec.help, spec.kind.value)


def build_info_family() -> Metric:
    """`trainwarden_build_info{version,python}` = 1, so dashboards can show what runs where."""
    family = Metric("trainwarden_build", "trainwarden version and Python it runs on.", "info")
    family.add_sample(
        "trainwarden_build_info",
        {"version": __version__, "python": platform.python_version()},
        1.0,
    )
    return family


def make_registry(store: Store) -> CollectorRegistry:
    """An explicit registry holding only the store exporter (no import-time globals)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreExporter(store))
    return registry
