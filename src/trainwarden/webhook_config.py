"""The `[webhook]` section: the Alertmanager receiver's limits, token, alert mapping and who acts.

Kept free of other trainwarden imports (bar errors), at the bottom layer beside `trainwarden.config`,
which embeds it::

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

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from trainwarden.errors import ConfigProblem

RULE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ALERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
DEFAULT_CLUSTER_HEALERS = ("slurm_drain", "k8s_drain", "command_drain")
"""Healers whose action is about a named node, not this one: any daemon may run them."""


def _no_rules() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class WebhookConfig:
    """Alertmanager webhook receiver settings; every default is safe (maps no alert, so acts on none)."""

    enabled: bool = True
    token_file: str = ""
    max_body_bytes: int = 1 << 20
    max_alerts: int = 1000
    queue_alerts: int = 10000
    cluster_healers: tuple[str, ...] = DEFAULT_CLUSTER_HEALERS
    actor: Literal["primary", "standby", "none"] = "primary"
    primary_url: str = ""
    primary_timeout_seconds: float = 2.0
    rules: Mapping[str, str] = field(default_factory=_no_rules)

    def problems(self) -> list[tuple[str, str]]:
        """Positive limits, a readable non-empty token file, valid names, a standby's primary."""
        found = [
            (key, "must be >= 1")
            for key in ("max_body_bytes", "max_alerts", "queue_alerts")
            if getattr(self, key) < 1
        ]
        if self.primary_timeout_seconds <= 0:
            found.append(("primary_timeout_seconds", "must be > 0"))
        if self.token_file:
            try:
                if not read_token(Path(self.token_file)):
                    found.append(("token_file", f"{self.token_file} is empty"))
            except OSError as exc:
                found.append(("token_file", f"cannot read {self.token_file}: {exc.strerror or exc}"))
        if self.actor == "standby" and not self.primary_url.startswith(("http://", "https://")):
            found.append(("primary_url", "a standby needs its primary's http(s):// URL"))
        found.extend(
            (f"rules.{alert}", f"alert name must match {ALERT_NAME.pattern}")
            for alert in self.rules
            if not ALERT_NAME.match(alert)
        )
        found.extend(
            (f"rules.{alert}", f"rule name {rule!r} must match {RULE_NAME.pattern}")
            for alert, rule in self.rules.items()
            if not RULE_NAME.match(rule)
        )
        return found


def read_token(path: Path) -> bytes:
    """The token in `path`, surrounding whitespace stripped (raises OSError)."""
    return path.read_bytes().strip()


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: only this machine can reach such a listener."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_problems(webhook: WebhookConfig, listen_host: str) -> list[ConfigProblem]:
    """A webhook on a listener other hosts can reach must have a token: it can drain nodes."""
    if webhook.enabled and not webhook.token_file and not is_loopback(listen_host):
        why = (
            f"required when daemon.listen ({listen_host}) is not loopback: anyone who can reach the "
            "port could otherwise post alerts (or set enabled = false)"
        )
        return [ConfigProblem("webhook", "token_file", why)]
    return []
