"""The collector registry: one line per collector module, each exposing `COLLECTOR`."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from trainwarden.registry import load_plugins

if TYPE_CHECKING:
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
    "trainwarden.preflight.collector",
)


@cache
def collector_classes() -> dict[str, type[Collector]]:
    """Every registered collector class by name, in registration order."""
    return load_plugins(COLLECTOR_MODULES, "COLLECTOR")
