"""What a healer is: one kind of action, checked, idempotent, with a dry run that touches nothing.

Healers know nothing of rules; the policy hands them an `Action` and journals the `ActionResult`.
A healer is one file defining a `Healer` subclass exposed as module-level `HEALER`, registered by
one line in `trainwarden.healers.HEALER_MODULES`.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from trainwarden.config import PluginOptions


class ActionOutcome(enum.StrEnum):
    """What happened when a healer was asked to act."""

    APPLIED = "applied"  # the change was made
    NOOP = "noop"  # state already as wanted (idempotence)
    DRY_RUN = "dry_run"  # would have acted; observe-only
    FAILED = "failed"  # tried and failed


@dataclass(frozen=True)
class Action:
    """A request to a healer. `key` identifies it for dedupe/idempotence across daemon restarts."""

    healer: str
    key: str
    reason: str
    subject: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str | float | int | bool] = field(default_factory=dict)
    evidence: Mapping[str, str | float] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionResult:
    """The outcome, with a human-readable detail an on-call can act on."""

    outcome: ActionOutcome
    detail: str
    data: Mapping[str, str | float | int | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class HealerContext:
    """What every healer gets: directories and a clock (never the store or the rules)."""

    runtime_dir: Path = Path("/run/trainwarden")
    state_dir: Path = Path("/var/lib/trainwarden")
    clock: Callable[[], float] = time.time


class Healer(abc.ABC):
    """Base of every healer."""

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions, context: HealerContext) -> None:
        self.options = options
        self.context = context

    @abc.abstractmethod
    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:
        """Check state, act if needed (never when `dry_run`), and report what happened."""
