"""The node's own trainwarden daemon: ready, and which findings it holds active right now.

Optional by nature: a node without a running daemon skips this check (a preflight runs without
the daemon); one that answers but is not ready, or holds a firing node-health finding, fails.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from trainwarden.preflight.model import CheckResult, PreflightOptions, Status

DAEMON = "daemon"
NODE_HEALTH_RULES = frozenset({"gpu_health"})
"""Rules whose firing finding means this node (not a job) is unwell."""
_MAX_STATUS_BYTES = 8 << 20


def check_daemon(options: PreflightOptions) -> list[CheckResult]:
    """Ask /status; absent daemon is skipped, not ready or a firing node-health finding fails."""
    started = time.monotonic()
    url = options.daemon_url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=options.daemon_timeout_seconds) as response:  # noqa: S310 - operator's URL
            data: Any = json.loads(response.read(_MAX_STATUS_BYTES))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        took = time.monotonic() - started
        return [CheckResult(DAEMON, Status.SKIPPED, f"no daemon answering at {url} ({reason})", took)]
    took = time.monotonic() - started
    if not isinstance(data, dict):
        return [CheckResult(DAEMON, Status.FAIL, f"{url} did not return a JSON object", took)]
    active = _active(data)
    firing = [a for a in active if a.get("state") == "firing"]
    node_bad = [a for a in firing if a.get("rule") in NODE_HEALTH_RULES]
    detail: dict[str, float | str] = {"active_findings": float(len(active)), "firing": float(len(firing))}
    if not data.get("ready"):
        return [CheckResult(DAEMON, Status.FAIL, "daemon answers but is not ready", took, detail)]
    if node_bad:
        text = "; ".join(str(a.get("summary", a.get("rule")))[:200] for a in node_bad)
        return [CheckResult(DAEMON, Status.FAIL, f"daemon reports: {text}", took, detail)]
    reason = f"daemon ready, {len(active)} active finding(s), {len(firing)} firing, none about node health"
    return [CheckResult(DAEMON, Status.PASS, reason, took, detail)]


def _active(data: dict[str, Any]) -> list[dict[str, Any]]:
    rules = data.get("rules")
    active = rules.get("active") if isinstance(rules, dict) else None
    return [a for a in active if isinstance(a, dict)] if isinstance(active, list) else []
