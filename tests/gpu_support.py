"""Helpers for the GPU/XID/interconnect tests: run collectors into a store and read the exposition."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from trainwarden.collectors.base import Collector
from trainwarden.daemon.exporter import make_registry
from trainwarden.model import Sample
from trainwarden.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
NOW = 1_700_000_000.0


def registry_of(samples: Iterable[Sample], source: str = "test") -> CollectorRegistry:
    """A registry exporting exactly `samples`, as the daemon's exporter would."""
    store = Store()
    store.replace(source, samples, NOW)
    return make_registry(store)


def collect_into(collector: Collector) -> CollectorRegistry:
    """One collection of `collector`, rendered through the real exporter."""
    return registry_of(collector.collect(), collector.name)


def exposition(registry: CollectorRegistry) -> str:
    """Text exposition minus build info (it names the Python version running the test)."""
    text = generate_latest(registry).decode()
    return "".join(line for line in text.splitlines(keepends=True) if "trainwarden_build" not in line)


def check_golden(golden: Path, actual: str, update: bool) -> None:
    """Compare with (or rewrite, under --update-golden) a committed exposition."""
    if update:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
    expected = golden.read_text()
    assert actual == expected, f"{golden} differs (pytest --update-golden rewrites it)"
