"""The `[webhook]` section: the Alertmanager receiver's limits, token, alert mapping and who acts.

This is its old import path (re-exports): it lives in `trainwarden.webhook_config`, at the bottom layer
beside `trainwarden.config`, which embeds it::

    [daemon]
    node_name = "gpu-07"              # default: the short hostname; the same name Slurm and Prometheus use

    [webhook]
    token_file = "/etc/trainwarden/webhook.token"   # required when daemon.listen is not loopback
    max_alerts = 1000                 # per notification; more is a 413
    queue_alerts = 10000              # accepted but not yet handled; full is a 503 (Alertmanager retries)
    cluster_healers = ["slurm_drain", "k8s_drain", "command_drain"]
    actor = "primary"                 # cluster-scope alerts: act at once ("standby": if the primary is down)
    # primary_url = "http://10.0.0.1:9871"  # a standby's primary, asked GET /healthz before acting

    [webhook.rules]                   # Alertmanager alertname -> the finding's rule (routes pick its healers)
    TrainwardenStragglerNode = "straggler_node"
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
