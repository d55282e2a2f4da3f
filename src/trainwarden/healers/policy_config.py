"""The `[policy]` section: when findings may become actions, and how far a fault may escalate.

This is its old import path (re-exports): it lives in `trainwarden.policy_config`, at the bottom layer
beside `trainwarden.config`, which embeds it.
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

from trainwarden.policy_config import (
    DEFAULT_LADDERS,
    DEFAULT_ROUTES,
    INTERRUPTIONS,
    Interruption,
    PolicyConfig,
)

__all__ = [
    "DEFAULT_LADDERS",
    "DEFAULT_ROUTES",
    "INTERRUPTIONS",
    "Interruption",
    "PolicyConfig",
]
