"""Helpers for the webhook and cluster tests: Alertmanager payloads, a recording drain command,
daemon configs, and (further down) real Prometheus / Alertmanager servers on loopback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import requests

from trainwarden.config import Config, config_from_dict
from trainwarden.plugins import plugin_groups

WEBHOOK = "/api/v1/alerts"
STARTS = "2026-12-01T10:00:00.123456789Z"

RECORDER = """\
import json, sys
with open(sys.argv[1], "a", encoding="utf-8") as out:
    out.write(json.dumps(sys.argv[2:]) + "\\n")
"""


def alert(
    name: str = "TrainwardenStragglerNode",
    *,
    status: str = "firing",
    fingerprint: str = "1a30ba71cca2921f",
    starts_at: str = STARTS,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One alert as Alertmanager's webhook payload (version 4) carries it."""
    return {
        "status": status,
        "labels": {
            "alertname": name,
            "job": "train",
            "node": "node-b",
            "severity": "warning",
            **(labels or {}),
        },
        "annotations": {"summary": "node-b is a straggler", **(annotations or {})},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://127.0.0.1:9090/graph?g0.expr=up",
        "fingerprint": fingerprint,
    }


def payload(*alerts: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    """A whole notification around `alerts`."""
    items = list(alerts) or [alert()]
    return {
        "version": "4",
        "groupKey": '{}:{alertname="TrainwardenStragglerNode"}',
        "truncatedAlerts": 0,
        "status": status or items[0]["status"],
        "receiver": "trainwarden",
        "groupLabels": {"alertname": items[0]["labels"]["alertname"]},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093",
        "alerts": items,
    }


def post(url: str, body: Any, token: str | None = None, raw: bytes | None = None) -> requests.Response:
    """POST a notification (or raw bytes) to a daemon's webhook."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(url + WEBHOOK, data=data, headers=headers, timeout=10)


def recorder(tmp_path: Path) -> tuple[list[str], Path]:
    """A drain command that appends its arguments to a file: (drain_argv, that file)."""
    script = tmp_path / "record_drain.py"
    script.write_text(RECORDER, encoding="utf-8")
    calls = tmp_path / "drains.jsonl"
    return [sys.executable, str(script), str(calls), "{node}", "{reason}"], calls


def drains(calls: Path) -> list[list[str]]:
    """Every drain the recorder ran: its arguments."""
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text(encoding="utf-8").splitlines()]


def webhook_config(
    tmp_path: Path,
    *,
    node: str = "node-a",
    listen: str = "127.0.0.1:0",
    drain_argv: list[str] | None = None,
    webhook: dict[str, Any] | None = None,
    actions: bool = True,
    state: str = "state",
) -> Config:
    """A daemon config with the webhook mapping the straggler alert to a command drain."""
    data: dict[str, Any] = {
        "daemon": {
            "listen": listen,
            "node_name": node,
            "runtime_dir": str(tmp_path / f"run-{node}"),
            "state_dir": str(tmp_path / f"{state}-{node}"),
        },
        "policy": {
            "actions_enabled": actions,
            "cooldown_seconds": 60,
            "routes": {"straggler_node": ["command_drain"], "node_clip": ["clip"]},
        },
        "webhook": {
            "rules": {"TrainwardenStragglerNode": "straggler_node", "TrainwardenLocalSpike": "node_clip"},
            **(webhook or {}),
        },
    }
    if drain_argv is not None:
        data["healers"] = {"command_drain": {"enabled": True, "drain_argv": drain_argv}}
    return config_from_dict(data, plugin_groups())
