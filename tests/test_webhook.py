"""The Alertmanager webhook receiver on a real daemon: findings, dedupe, who acts, tokens, metrics."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from cluster_support import alert, drains, payload, post, recorder, webhook_config
from support import wait_until
from trainwarden.config import Config, config_from_dict
from trainwarden.daemon.app import Daemon
from trainwarden.daemon.webhook import Webhook
from trainwarden.errors import ConfigError
from trainwarden.journal import Journal
from trainwarden.plugins import plugin_groups


@contextmanager
def running(config: Config) -> Iterator[tuple[Daemon, str]]:
    daemon = Daemon(config)
    daemon.start()
    try:
        host, port = daemon.address
        yield daemon, f"http://{host}:{port}"
    finally:
        daemon.stop()


def settle(daemon: Daemon) -> None:
    """Wait until the webhook's worker has handled everything accepted so far."""
    route, _ = daemon.routes.resolve("POST", "/api/v1/alerts")
    assert route is not None
    webhook = route.__self__  # type: ignore[attr-defined]
    assert isinstance(webhook, Webhook)
    webhook.join()


def value(daemon: Daemon, name: str, **labels: str) -> float:
    sample = daemon.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def taken(config: Config) -> list[Any]:
    journal = Journal.in_state_dir(config.daemon.state_dir)
    try:
        return [e for e in journal.recent(100) if e.decision == "taken"]
    finally:
        journal.close()


def test_a_firing_alert_becomes_one_journaled_drain_of_the_node_it_names(tmp_path: Path) -> None:
    """A straggler alert about node-b drains node-b once; labels beyond the subject are evidence."""
    argv, calls = recorder(tmp_path)
    config = webhook_config(tmp_path, drain_argv=argv)
    with running(config) as (daemon, url):
        answer = post(url, payload(alert(labels={"instance": "10.0.0.2:9871"})))
        assert answer.status_code == 200, answer.text
        settle(daemon)
        assert value(daemon, "trainwarden_webhook_alerts_total", status="firing", result="to_policy") == 1
        assert value(daemon, "trainwarden_webhook_requests_total", result="accepted") == 1
    assert [call[0] for call in drains(calls)] == ["node-b"]
    [entry] = taken(config)
    assert entry.rule == "straggler_node"
    assert entry.subject == "job=train,node=node-b"
    assert entry.result == "applied"
    assert entry.evidence["label_instance"] == "10.0.0.2:9871"
    assert entry.evidence["alertname"] == "TrainwardenStragglerNode"


def test_two_deliveries_at_once_and_a_replay_after_restart_act_once(tmp_path: Path) -> None:
    """Two unclustered Alertmanagers posting the same alert concurrently, then a replay to a restarted
    daemon on the same state dir: one drain, one journal entry, the rest counted as duplicates."""
    argv, calls = recorder(tmp_path)
    config = webhook_config(tmp_path, drain_argv=argv)
    body = payload(alert())
    with running(config) as (daemon, url):
        barrier = threading.Barrier(4)
        answers: list[int] = []

        def deliver() -> None:
            barrier.wait()
            answers.append(post(url, body).status_code)

        threads = [threading.Thread(target=deliver) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [200] * 4
        settle(daemon)
        assert value(daemon, "trainwarden_webhook_alerts_total", status="firing", result="duplicate") == 3
    with running(config) as (daemon, url):
        assert post(url, body).status_code == 200
        settle(daemon)
        assert value(daemon, "trainwarden_webhook_alerts_total", status="firing", result="duplicate") == 1
    assert len(drains(calls)) == 1
    assert len(taken(config)) == 1


def test_a_resolved_alert_resolves_its_finding_and_acts_on_nothing(tmp_path: Path) -> None:
    """The resolved delivery of a fired alert leaves nothing firing in /status and drains nothing more."""
    argv, calls = recorder(tmp_path)
    config = webhook_config(tmp_path, drain_argv=argv)
    with running(config) as (daemon, url):
        post(url, payload(alert()))
        settle(daemon)
        assert [a["alertname"] for a in daemon.status()["webhook"]["firing"]] == ["TrainwardenStragglerNode"]
        post(url, payload(alert(status="resolved")))
        post(url, payload(alert(status="resolved")))
        settle(daemon)
        assert daemon.status()["webhook"]["firing"] == []
        assert value(daemon, "trainwarden_webhook_alerts_total", status="resolved", result="resolved") == 1
        assert value(daemon, "trainwarden_webhook_alerts_total", status="resolved", result="duplicate") == 1
    assert len(drains(calls)) == 1


def test_node_scope_alerts_act_only_on_the_named_node(tmp_path: Path) -> None:
    """A clip alert about node-b is left alone by node-a's daemon and handed to the policy by node-b's."""
    spike = alert("TrainwardenLocalSpike", labels={"node": "node-b"})
    with running(webhook_config(tmp_path, node="node-a")) as (daemon, url):
        post(url, payload(spike))
        settle(daemon)
        assert value(daemon, "trainwarden_webhook_alerts_total", status="firing", result="other_node") == 1
    config_b = webhook_config(tmp_path, node="node-b")
    with running(config_b) as (daemon, url):
        post(url, payload(spike))
        settle(daemon)
        assert value(daemon, "trainwarden_webhook_alerts_total", status="firing", result="to_policy") == 1
    assert [e.rule for e in taken(config_b)] == ["node_clip"]


def test_a_standby_acts_only_while_its_primary_is_down(tmp_path: Path) -> None:
    """A standby defers cluster-scope alerts while its primary answers /healthz, and drains when not."""
    argv, calls = recorder(tmp_path)
    with running(webhook_config(tmp_path, node="node-a")) as (primary, primary_url):
        wait_until(primary.ready.is_set, 30, "primary ready")
        standby_config = webhook_config(
            tmp_path, node="node-c", drain_argv=argv, webhook={"actor": "standby", "primary_url": primary_url}
        )
        with running(standby_config) as (standby, url):
            post(url, payload(alert()))
            settle(standby)
            assert value(standby, "trainwarden_webhook_alerts_total", status="firing", result="deferred") == 1
            assert drains(calls) == []
            primary.stop()
            post(url, payload(alert()))  # Alertmanager's repeat of the same alert
            settle(standby)
            assert (
                value(standby, "trainwarden_webhook_alerts_total", status="firing", result="to_policy") == 1
            )
    assert [call[0] for call in drains(calls)] == ["node-b"]


def test_unmapped_alerts_are_observed_and_observe_only_drains_nothing(tmp_path: Path) -> None:
    """An alert missing from [webhook.rules] acts on nothing; with actions off a mapped one is a dry run."""
    argv, calls = recorder(tmp_path)
    config = webhook_config(tmp_path, drain_argv=argv, actions=False)
    with running(config) as (daemon, url):
        post(url, payload(alert("SomethingElse", fingerprint="ff"), alert()))
        settle(daemon)
        assert value(daemon, "trainwarden_webhook_alerts_total", status="firing", result="unmapped") == 1
    assert drains(calls) == []
    assert [e.result for e in taken(config)] == ["dry_run"]


def test_a_token_is_required_off_loopback_and_checked(tmp_path: Path) -> None:
    """Listening on a non-loopback address without a token file is a config error; a wrong or missing
    token is a 401, counted, and nothing is queued."""
    data: dict[str, Any] = {"daemon": {"listen": "0.0.0.0:9871"}}
    with pytest.raises(ConfigError, match=r"\[webhook\] token_file: required"):
        config_from_dict(data, plugin_groups())
    token = tmp_path / "token"
    token.write_text("s3cret-token\n", encoding="utf-8")
    argv, calls = recorder(tmp_path)
    config = webhook_config(tmp_path, drain_argv=argv, webhook={"token_file": str(token)})
    with running(config) as (daemon, url):
        assert post(url, payload()).status_code == 401
        wrong = post(url, payload(), token="s3cret-tokem")
        assert wrong.status_code == 401
        assert "wrong bearer token" in wrong.text
        assert post(url, payload(), token="s3cret-token").status_code == 200
        settle(daemon)
        assert value(daemon, "trainwarden_webhook_requests_total", result="unauthorized") == 2
    assert len(drains(calls)) == 1


def test_non_loopback_listen_from_the_command_line_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    """A --listen override to a routable address (after the file was checked) stops the daemon's start."""
    config = webhook_config(tmp_path, listen="127.0.0.1:0")
    config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, listen="0.0.0.0:0"))
    daemon = Daemon(config)
    with pytest.raises(ConfigError, match="token_file"):
        daemon.start()
    daemon.stop()


def test_a_full_queue_answers_503_so_alertmanager_retries(tmp_path: Path) -> None:
    """With room for 2 queued alerts, a 3-alert notification is refused with 503 and Retry-After."""
    config = webhook_config(tmp_path, webhook={"queue_alerts": 2})
    with running(config) as (daemon, url):
        many = payload(*(alert(fingerprint=f"{i:x}") for i in range(1, 4)))
        answer = post(url, many)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "5"
        assert value(daemon, "trainwarden_webhook_requests_total", result="queue_full") == 1


def test_webhook_answers_within_the_request_and_counts_by_result(tmp_path: Path) -> None:
    """Every request result has a zero series from the start, so a rate() over them works at once."""
    with running(webhook_config(tmp_path)) as (daemon, url):
        text = requests.get(url + "/metrics", timeout=10).text
        for result in ("accepted", "unauthorized", "bad_request", "too_large", "queue_full"):
            assert f'trainwarden_webhook_requests_total{{result="{result}"}} 0.0' in text
        assert daemon.status()["webhook"]["node_name"] == "node-a"
