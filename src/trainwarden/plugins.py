"""Every plugin group's options classes, the one thing the config loader needs to know about plugins.

Each group maps a plugin name to its `Options` dataclass; the loader validates
`[collectors.NAME]` (and later `[rules.NAME]`, `[healers.NAME]`) tables against them. A new group
is one entry in `plugin_groups()`.
"""

from __future__ import annotations

from collections.abc import Mapping

from trainwarden.collectors import collector_classes
from trainwarden.config import PluginOptions
from trainwarden.healers import healer_classes
from trainwarden.rules import rule_classes


def plugin_groups() -> dict[str, Mapping[str, type[PluginOptions]]]:
    """Plugin group ("collectors", ...) → plugin name → its options class, in registration order."""
    return {
        "collectors": {name: cls.Options for name, cls in collector_classes().items()},
        "rules": {name: cls.Options for name, cls in rule_classes().items()},
        "healers": {name: cls.Options for name, cls in healer_classes().items()},
    }
