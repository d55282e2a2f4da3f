"""Loading of plugin registries: a tuple of module names, each exposing one class by attribute.

Collectors, rules and healers all register the same way (one line per module), so one loader
serves the three registries. Modules are imported lazily, which also keeps the registries free
of import cycles with the config module.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any


def load_plugins(modules: Iterable[str], attribute: str) -> dict[str, Any]:
    """Import each module and collect its `attribute` class by `name`, in registration order."""
    found: dict[str, Any] = {}
    for module_name in modules:
        cls = getattr(importlib.import_module(module_name), attribute)
        name = getattr(cls, "name", None)
        if not isinstance(name, str):
            raise TypeError(f"{module_name}.{attribute} has no string `name`")
        if name in found:
            raise RuntimeError(f"{attribute.lower()} name {name!r} registered twice")
        found[name] = cls
    return found
