"""The `[policy]` section's old import path (re-exports only).

It lives, with its example, in `trainwarden.policy_config`, at the bottom layer beside `trainwarden.config`.
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
