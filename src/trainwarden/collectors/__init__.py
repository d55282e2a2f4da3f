"""The collector registry: one line per collector module, each exposing `COLLECTOR`."""

from __future__ import annotations

import importlib
from functools import cache

from trainwarden.collectors.base import Collector

COLLECTOR_MODULES: tuple[str, ...] = (
    "trainwarden.collectors.cpu",
    "trainwarden.collectors.memory",
    "trainwarden.collectors.load",
    "trainwarden.collectors.disk_usage",
    "trainwarden.collectors.diskstats",
    "trainwarden.collectors.netdev",
    "trainwarden.collectors.pressure",
    "trainwarden.collectors.self_process",
    "trainwarden.collectors.training",
    "trainwarden.collectors.gpu",
    "trainwarden.collectors.kmsg",
    "trainwarden.collectors.xid",
    "trainwarden.collectors.infiniband",
    "trainwarden.collectors.nccl_inspector",
    "trainwarden.collectors.nccl_ras",
)


@cache
def collector_classes() -> dict[str, type[Collector]]:
    """Every registered collector class by name, in registration order."""
    found: dict[str, type[Collector]] = {}
    for module_name in COLLECTOR_MODULES:
        cls: type[Collector] = importlib.import_module(module_name).COLLECTOR
        if cls.name in found:
            raise RuntimeError(f"collector name {cls.name!r} registered twice")
        found[cls.name] = cls
    return found
