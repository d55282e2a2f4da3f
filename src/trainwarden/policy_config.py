"""The `[policy]` section: when findings may become actions, and how far a fault may escalate.

Kept free of other trainwarden imports (bar errors), at the bottom layer beside `trainwarden.config`,
which embeds it.
Routes and ladders given in the file are merged over the defaults key by key, so configuring the
ladder of one rule does not drop the defaults of the others::

    [policy]
    actions_enabled = true          # observe-only (dry run) unless this is true
    cooldown_seconds = 120
    relax_clip_after_seconds = 1800  # relax tightened clipping step by step once spikes stop
    attempts_per_rung = 1           # tries of one rung per fault before climbing the ladder
    recurrence_seconds = 300        # the same fault this soon after an action: the action failed
    budget_window_seconds = 3600

    [policy.routes]                 # rule -> escalation ladder (overrides the class ladder)
    spike = ["clip", "checkpoint_restart"]   # opt in: by default a spike is only observed

    [policy.ladders]                # interruption class -> ladder, for rules without a route
    persistent = ["checkpoint_restart", "slurm_drain"]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from trainwarden.errors import ConfigProblem

Interruption = Literal["transient", "persistent", "planned"]
INTERRUPTIONS: tuple[Interruption, ...] = ("transient", "persistent", "planned")

DEFAULT_ROUTES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "spike": (),  # changes the training: opt in with e.g. spike = ["clip", "checkpoint_restart"]
        # in place when the job's hello says it can (else that rung is skipped), then a restart
        "nonfinite": ("rollback", "checkpoint_restart"),
        "straggler": (),
        "throughput_drop": (),
        "threshold": (),
    }
)
"""Rules with their own ladder; an empty ladder means observe and alert only.

A spike is observed only by default: tightening the clipping changes a training run, which the
user must choose (a false spike acted on would harm a healthy run).
"""

DEFAULT_LADDERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "transient": ("checkpoint_restart",),
        "persistent": ("checkpoint_restart",),
        "planned": ("checkpoint_restart",),
    }
)
"""Per interruption class: retry in place; a bad node (add your drain healer); checkpoint and exit."""


def _empty_routes() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class PolicyConfig:
    """Policy settings; every default is safe (observe-only)."""

    actions_enabled: bool = False
    cooldown_seconds: float = 120.0
    budget_window_seconds: float = 3600.0
    attempts_per_rung: int = 1
    recurrence_seconds: float = 300.0
    max_actions_per_window: int = 20
    breaker_failures: int = 3
    breaker_open_seconds: float = 900.0
    alert_healers: tuple[str, ...] = ("notify",)
    journal_retention_seconds: float = 30 * 86400.0
    relax_clip_after_seconds: float = 1800.0
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=_empty_routes)
    ladders: Mapping[str, tuple[str, ...]] = field(default_factory=_empty_routes)
    classes: Mapping[str, Interruption] = field(default_factory=lambda: MappingProxyType({}))

    def problems(self) -> list[tuple[str, str]]:
        """Positive durations and budgets, known interruption classes."""
        positive = (
            "cooldown_seconds",
            "recurrence_seconds",
            "budget_window_seconds",
            "breaker_open_seconds",
            "journal_retention_seconds",
        )
        found = [(key, "must be > 0") for key in positive if getattr(self, key) <= 0]
        counts = ("attempts_per_rung", "max_actions_per_window", "breaker_failures")
        found.extend((key, "must be >= 1") for key in counts if getattr(self, key) < 1)
        if self.relax_clip_after_seconds < 0:
            found.append(("relax_clip_after_seconds", "must be >= 0 (0 never relaxes)"))
        windows = (
            "budget_window_seconds",
            "breaker_open_seconds",
            "cooldown_seconds",
            "relax_clip_after_seconds",
        )
        longest = max(windows, key=lambda key: float(getattr(self, key)))
        if self.journal_retention_seconds < self.horizon_seconds():
            why = f"must be >= the longest policy window ({longest} = {getattr(self, longest):g})"
            found.append(("journal_retention_seconds", why))  # and under the window: either may be the typo
            retention = self.journal_retention_seconds
            found.append((longest, f"must be <= journal_retention_seconds ({retention:g})"))
        found.extend(
            (f"ladders.{name}", f"unknown interruption class (valid: {', '.join(INTERRUPTIONS)})")
            for name in self.ladders
            if name not in INTERRUPTIONS
        )
        return found

    def healer_problems(self, registered: Iterable[str]) -> list[ConfigProblem]:
        """Every healer named in routes, ladders and alert_healers must be registered.

        The loader runs this with the registered healer names, so check-config refuses what the
        policy would refuse at start; the default `alert_healers` may name an absent healer.
        """
        known = set(registered)
        valid = ", ".join(sorted(known)) or "none"
        found = [
            ConfigProblem(f"policy.{table}", name, f"unknown healer {healer!r} (registered: {valid})")
            for table, ladders in (("routes", self.routes), ("ladders", self.ladders))
            for name, ladder in ladders.items()
            for healer in ladder
            if healer not in known
        ]
        if self.alert_healers != PolicyConfig().alert_healers:
            found.extend(
                ConfigProblem("policy", "alert_healers", f"unknown healer {healer!r} (registered: {valid})")
                for healer in self.alert_healers
                if healer not in known
            )
        return found

    def horizon_seconds(self) -> float:
        """How far back the policy reads the journal: its longest window."""
        return max(
            self.budget_window_seconds,
            self.breaker_open_seconds,
            self.cooldown_seconds,
            self.relax_clip_after_seconds,
        )

    def effective_routes(self) -> dict[str, tuple[str, ...]]:
        """Default routes overlaid with the configured ones."""
        return {**DEFAULT_ROUTES, **self.routes}

    def effective_ladders(self) -> dict[str, tuple[str, ...]]:
        """Default class ladders overlaid with the configured ones."""
        return {**DEFAULT_LADDERS, **self.ladders}
