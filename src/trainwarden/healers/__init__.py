"""The healer registry: one line per healer module, each exposing `HEALER`."""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainwarden.healers.base import Healer

HEALER_MODULES: tuple[str, ...] = (
    "trainwarden.healers.clip",
    "trainwarden.healers.notify",
    "trainwarden.healers.slurm_drain",
    "trainwarden.healers.k8s_drain",
    "trainwarden.healers.command_drain",
)


@cache
def healer_classes() -> dict[str, type[Healer]]:
    """Every registered healer class by name, in registration order."""
    found: dict[str, type[Healer]] = {}
    for module_name in HEALER_MODULES:
        cls: type[Healer] = importlib.import_module(module_name).HEALER
        if cls.name in found:
            raise RuntimeError(f"healer name {cls.name!r} registered twice")
        found[cls.name] = cls
    return found
