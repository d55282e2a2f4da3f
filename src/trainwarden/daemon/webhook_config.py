"""The `[webhook]` section's old import path (re-exports only).

It lives, with its example, in `trainwarden.webhook_config`, at the bottom layer beside `trainwarden.config`.
"""

from __future__ import annotations

from trainwarden.webhook_config import (
    ALERT_NAME,
    DEFAULT_CLUSTER_HEALERS,
    RULE_NAME,
    WebhookConfig,
    is_loopback,
    listen_problems,
    read_token,
)

__all__ = [
    "ALERT_NAME",
    "DEFAULT_CLUSTER_HEALERS",
    "RULE_NAME",
    "WebhookConfig",
    "is_loopback",
    "listen_problems",
    "read_token",
]
