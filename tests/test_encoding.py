"""The fast exposition encoders produce exactly prometheus_client's bytes for every negotiated format."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from trainwarden.daemon.encoding import fast_encoder
from trainwarden.daemon.exporter import make_registry
from trainwarden.model import MetricKind, MetricSpec
from trainwarden.store import Store

GAUGE = MetricSpec(
    "trainwarden_t_temperature_celsius", 'Help with "quotes", a \\ and\na newline.', labelnames=("gpu",)
)
COUNTER = MetricSpec("trainwarden_t_events_total", "Events.", MetricKind.COUNTER, ("kind", "rank"))
INFO = MetricSpec("trainwarden_t_node_info", "Node facts.", MetricKind.INFO, ("driver",))
PLAIN = MetricSpec("trainwarden_t_up", "Up.")
HIST = MetricSpec("trainwarden_t_step_seconds", "Step time.", MetricKind.HISTOGRAM, ("rank",))

ACCEPTS = [
    "",
    "text/plain",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=0.0.1",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
]


def populated_store() -> Store:
    store = Store()
    samples = [
        GAUGE.sample(71.5, gpu="0"),
        GAUGE.sample(float("nan"), gpu="1"),
        GAUGE.sample(float("inf"), gpu='we"ird\\one\nline'),
        GAUGE.sample(-0.0, gpu="ünïcode ✓"),
        COUNTER.sample(3, kind="xid", rank="0"),
        COUNTER.sample(12345678901234.0, kind="oom", rank="1"),
        INFO.sample(1, driver="550.54.15"),
        PLAIN.sample(1e-9),
        HIST.sample(4, suffix="_bucket", rank="0", le="0.5"),
        HIST.sample(7, suffix="_bucket", rank="0", le="+Inf"),
        HIST.sample(7, suffix="_count", rank="0"),
        HIST.sample(2.25, suffix="_sum", rank="0"),
    ]
    store.replace("test", samples, now=1_700_000_000.0)
    return store


@pytest.mark.parametrize("accept", ACCEPTS)
def test_fast_encoder_matches_the_library_byte_for_byte(accept: str) -> None:
    """For every Accept header a scraper may send, the bytes and content type equal prometheus_client's."""
    registry = make_registry(populated_store())
    library, library_type = choose_encoder(accept)
    fast, fast_type = fast_encoder(accept)
    assert fast_type == library_type
    assert fast(registry) == library(registry)
    rewrites_names = "escaping=dots" in accept or "escaping=values" in accept
    assert (
        getattr(fast, "__qualname__", "").startswith("fast_encoder.") != rewrites_names
    )  # the fast path really ran


class _Odd(Collector):
    """A family only the library can render exactly (a UTF-8 metric name)."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("trainwarden.dotted.name", "Dotted.", labels=["a"])
        family.add_metric(["x"], 1.0)
        yield family


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8"])
def test_names_outside_the_legacy_charset_fall_back_to_the_library(accept: str) -> None:
    """A non-legacy name is rendered by prometheus_client itself, so output stays exact."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Odd())
    library, _ = choose_encoder(accept)
    fast, _ = fast_encoder(accept)
    assert fast(registry) == library(registry)
