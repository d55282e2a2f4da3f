"""Hostile input to the webhook: every bad notification is a 4xx with the reason, counted, acts on nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from cluster_support import alert, drains, payload, post, recorder, webhook_config
from fuzz_support import fuzz
from trainwarden.daemon.app import Daemon
from trainwarden.daemon.http import Request
from trainwarden.daemon.webhook import Webhook
from trainwarden.daemon.webhook_config import WebhookConfig
from trainwarden.daemon.webhook_seen import SeenAlerts
from trainwarden.model import Finding
from trainwarden.store import Store

PWNED = "/tmp/trainwarden-webhook-pwned"


class Recorder:
    """Stands in for the policy: remembers every finding handed over."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def decide(self, findings: Sequence[Finding]) -> list[Any]:
        self.findings.extend(findings)
        return []


def make_webhook(tmp_path: Path, **options: Any) -> tuple[Webhook, Recorder, Store]:
    config = WebhookConfig(rules={"TrainwardenStragglerNode": "straggler_node"}, **options)
    policy = Recorder()
    store = Store(window_seconds=60)
    webhook = Webhook(
        config,
        node_name="node-a",
        decide=policy.decide,
        ladder_for=lambda _finding: ("slurm_drain",),
        seen=SeenAlerts(tmp_path / "journal.sqlite3"),
        store=store,
    )
    webhook.start()
    return webhook, policy, store


def request(body: bytes, content_type: str = "application/json") -> Request:
    return Request("POST", "/api/v1/alerts", headers={"Content-Type": content_type}, body=body)


def counted(store: Store, name: str, **labels: str) -> float:
    for series in store.latest():
        if series.name == name and dict(series.labels) == labels:
            return series.value
    return 0.0


def without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("malformed JSON", b'{"version": "4", "alerts": [', 400, "not JSON"),
    ("not UTF-8", b'{"version": "\xff"}', 400, "not UTF-8"),
    ("an array", b"[]", 400, "must be a JSON object"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, "not JSON"),
    ("wrong version", json.dumps({**payload(), "version": "3"}).encode(), 400, 'version must be "4"'),
    ("no alerts field", json.dumps(without(payload(), "alerts")).encode(), 400, "payload lacks alerts"),
    ("alerts not a list", json.dumps({**payload(), "alerts": {}}).encode(), 400, "must be an array"),
    (
        "alert without fingerprint",
        json.dumps(payload(without(alert(), "fingerprint"))).encode(),
        400,
        "lacks",
    ),
    ("bad status", json.dumps(payload(alert(status="pending"))).encode(), 400, "firing or resolved"),
    ("bad startsAt", json.dumps(payload(alert(starts_at="yesterday"))).encode(), 400, "RFC 3339"),
    (
        "label not a string",
        json.dumps(payload({**alert(), "labels": {"alertname": 1}})).encode(),
        400,
        "string",
    ),
    (
        "shell in the node label",
        json.dumps(payload(alert(labels={"node": f"$(touch {PWNED})"}))).encode(),
        400,
        "labels.node",
    ),
    (
        "semicolon in the job label",
        json.dumps(payload(alert(labels={"job": "x; rm -rf /"}))).encode(),
        400,
        "job",
    ),
    ("unicode node name", json.dumps(payload(alert(labels={"node": "nöde-b"}))).encode(), 400, "plain name"),
    (
        "10,000 alerts",
        json.dumps(payload(*(alert(fingerprint=f"{i:x}") for i in range(10_000)))).encode(),
        413,
        "10000 alerts",
    ),
]


@pytest.mark.parametrize(("body", "status", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_notifications_are_refused_with_the_reason(
    tmp_path: Path, body: bytes, status: int, reason: str
) -> None:
    """Each bad notification gets its 4xx naming what is wrong, is counted, and nothing reaches the policy."""
    webhook, policy, store = make_webhook(tmp_path, max_body_bytes=64 << 20)
    answer = webhook.handle(request(body))
    webhook.join()
    assert answer.status == status
    assert reason in answer.body.decode()
    result = "too_large" if status == 413 else "bad_request"
    assert counted(store, "trainwarden_webhook_requests_total", result=result) == 1
    assert policy.findings == []


def test_a_body_that_is_not_json_by_content_type_is_415(tmp_path: Path) -> None:
    """A form post (what a misconfigured client sends) is refused as an unsupported media type."""
    webhook, policy, _ = make_webhook(tmp_path)
    answer = webhook.handle(request(json.dumps(payload()).encode(), "application/x-www-form-urlencoded"))
    assert answer.status == 415
    assert policy.findings == []


def test_shell_syntax_in_annotations_is_only_ever_an_argument(tmp_path: Path) -> None:
    """`$(touch …)` and `; rm -rf` in annotations reach the drain command as inert text, never a shell."""
    argv, calls = recorder(tmp_path)
    config = webhook_config(tmp_path, drain_argv=argv)
    nasty = f"$(touch {PWNED}); rm -rf / `touch {PWNED}`"
    daemon = Daemon(config)
    daemon.start()
    try:
        host, port = daemon.address
        url = f"http://{host}:{port}"
        body = payload(alert(annotations={"summary": nasty, "description": "ünïcødé ✓ " + nasty}))
        assert post(url, body).status_code == 200
        route, _ = daemon.routes.resolve("POST", "/api/v1/alerts")
        route.__self__.join()  # type: ignore[union-attr]
    finally:
        daemon.stop()
    assert not Path(PWNED).exists()
    [call] = drains(calls)
    assert call[0] == "node-b"
    assert f"(touch {PWNED}); rm -rf /" in call[1]  # one argument; `$` and backticks defused


def test_an_oversize_body_is_413_and_the_daemon_stays_fine(tmp_path: Path) -> None:
    """A body over the limit is refused before it is parsed, and the daemon keeps answering."""
    config = webhook_config(tmp_path, webhook={"max_body_bytes": 4096})
    daemon = Daemon(config)
    daemon.start()
    try:
        host, port = daemon.address
        url = f"http://{host}:{port}"
        big = payload(alert(annotations={"description": "x" * 4000}), alert(fingerprint="ab"))
        answer = post(url, big)
        assert answer.status_code == 413
        assert "over the limit of 4096" in answer.text
        assert requests.get(url + "/healthz", timeout=10).status_code in (200, 503)
        assert (
            daemon.registry.get_sample_value("trainwarden_webhook_requests_total", {"result": "too_large"})
            == 1
        )
    finally:
        daemon.stop()


def test_replays_of_one_notification_hand_each_alert_over_once(tmp_path: Path) -> None:
    """The same two-alert notification posted 20 times gives the policy exactly two findings."""
    webhook, policy, store = make_webhook(tmp_path)
    body = json.dumps(payload(alert(), alert(fingerprint="2b", labels={"node": "node-c"}))).encode()
    for _ in range(20):
        assert webhook.handle(request(body)).status == 200
    webhook.join()
    assert sorted(f.subject["node"] for f in policy.findings) == ["node-b", "node-c"]
    assert counted(store, "trainwarden_webhook_alerts_total", status="firing", result="duplicate") == 38


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
ALERT_KEYS = ("status", "labels", "annotations", "startsAt", "endsAt", "fingerprint", "generatorURL")
TOP_KEYS = ("version", "groupKey", "status", "receiver", "groupLabels", "commonLabels", "alerts")


def test_fuzzed_notifications_never_crash_and_never_act_on_bad_input(tmp_path: Path) -> None:
    """Mutated payloads and random bytes get 200 or a 4xx, never a 5xx; only valid alerts reach the policy."""
    webhook, policy, _ = make_webhook(tmp_path)
    fingerprints = iter(range(1, 1 << 30))

    @fuzz(5 / 6)
    @given(
        top=st.dictionaries(st.sampled_from(TOP_KEYS), json_values, max_size=2),
        item=st.dictionaries(st.sampled_from(ALERT_KEYS), json_values, max_size=2),
        labels=st.dictionaries(
            st.sampled_from(("node", "job", "gpu", "x")), st.text(max_size=30), max_size=3
        ),
        junk=st.binary(max_size=40),
    )
    def deliver(top: dict[str, Any], item: dict[str, Any], labels: dict[str, str], junk: bytes) -> None:
        before = len(policy.findings)
        body = payload(alert(labels=labels, fingerprint=f"{next(fingerprints):x}"))
        body["alerts"][0].update(item)
        body.update(top)
        for raw in (json.dumps(body).encode(), junk):
            answer = webhook.handle(request(raw))
            assert answer.status in (200, 400, 413), answer.body
            assert answer.body
        webhook.join()
        assert len(policy.findings) - before <= 1
        for finding in policy.findings[before:]:
            assert set(finding.subject) <= {"job", "node", "gpu", "rank"}
            assert all(value.isascii() and " " not in value for value in finding.subject.values())

    try:
        deliver()
    finally:
        webhook.stop()
