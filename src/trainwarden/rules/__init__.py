"""The rule registry: one line per rule module, each exposing `RULE`."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from trainwarden.registry import load_plugins

if TYPE_CHECKING:
    from trainwarden.rules.base import Rule

RULE_MODULES: tuple[str, ...] = (
    "trainwarden.rules.stall",
    "trainwarden.rules.collective",
    "trainwarden.rules.process_gone",
    "trainwarden.rules.spike",
    "trainwarden.rules.nonfinite",
    "trainwarden.rules.straggler",
    "trainwarden.rules.throughput",
    "trainwarden.rules.threshold",
    "trainwarden.rules.gpu_health",
)


@cache
def rule_classes() -> dict[str, type[Rule]]:
    """Every registered rule class by name, in registration order."""
    return load_plugins(RULE_MODULES, "RULE")
