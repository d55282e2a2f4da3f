"""The healer registry: one line per healer module, each exposing `HEALER`."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from trainwarden.registry import load_plugins

if TYPE_CHECKING:
    from trainwarden.healers.base import Healer

HEALER_MODULES: tuple[str, ...] = (
    "trainwarden.healers.clip",
    "trainwarden.healers.notify",
    "trainwarden.healers.slurm_drain",
    "trainwarden.healers.k8s_drain",
    "trainwarden.healers.command_drain",
    "trainwarden.healers.checkpoint_restart",
    "trainwarden.healers.rollback",
)


@cache
def healer_classes() -> dict[str, type[Healer]]:
    """Every registered healer class by name, in registration order."""
    return load_plugins(HEALER_MODULES, "HEALER")
