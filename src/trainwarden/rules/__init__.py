"""The rule registry: one line per rule module, each exposing `RULE`."""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

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
    found: dict[str, type[Rule]] = {}
    for module_name in RULE_MODULES:
        cls: type[Rule] = importlib.import_module(module_name).RULE
        if cls.name in found:
            raise RuntimeError(f"rule name {cls.name!r} registered twice")
        found[cls.name] = cls
    return found
