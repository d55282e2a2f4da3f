"""Two nodes on this machine, end to end on real parts: the cluster loop from a slow node to a Slurm drain.

Node A (127.0.0.2) and node B (127.0.0.3) each run a trainwarden daemon; a torchrun job spans
them (c10d rendezvous, gloo), each node's rank reporting to its own daemon; a real Prometheus
scrapes both with the shipped rules (intervals shortened, see `cluster_support.shortened_rules`);
two real Alertmanagers run the shipped example config; a real Slurm knows both node names.
Daemon A is the primary actor, daemon B its standby.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cluster_support import (
    NODES,
    Server,
    alertmanager_config,
    cluster_daemon_config,
    firing,
    node_field,
    query,
    servers_skip_reason,
    start_alertmanagers,
    start_job_on_nodes,
    start_prometheus,
    start_two_node_slurm,
    stop_job,
    stop_slurm,
)
from support import free_port, wait_until
from trainwarden.config import Config
from trainwarden.daemon.app import Daemon
from trainwarden.journal import Journal

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class Cluster:
    root: Path
    slurm: Any
    prometheus: Server
    am_ports: list[int]
    configs: dict[str, Config]
    daemons: dict[str, Daemon]
    urls: dict[str, str]
    token: Path
    ctl: Path

    def start_daemon(self, node: str) -> None:
        daemon = Daemon(self.configs[node])
        daemon.start()
        self.daemons[node] = daemon

    def fresh_daemons(self, tag: str) -> None:
        """Restart both daemons on new state dirs: a new test starts with an empty journal."""
        for node in list(self.daemons):
            self.daemons.pop(node).stop()
        for node, config in self.configs.items():
            state = config.daemon.state_dir.with_name(f"state-{tag}")
            self.configs[node] = dataclasses.replace(
                config, daemon=dataclasses.replace(config.daemon, state_dir=state)
            )
            self.start_daemon(node)

    def quiet(self) -> bool:
        """No straggler alert pending or firing, and every node within 1.2x of its job's median."""
        alerts = requests.get(self.prometheus.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        ratios = query(self.prometheus, "job_node:trainwarden_train_step_seconds:ratio_to_job_p50")
        return (
            not any(a["labels"]["alertname"] == "TrainwardenStragglerNode" for a in alerts)
            and len(ratios) == 2
            and all(float(r["value"][1]) < 1.2 for r in ratios)
        )

    def metric(self, node: str, name: str, **labels: str) -> float:
        value = self.daemons[node].registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def taken(self, node: str, rule: str) -> list[Any]:
        journal = Journal.in_state_dir(self.configs[node].daemon.state_dir)
        try:
            return [e for e in journal.recent(500) if e.rule == rule and e.decision == "taken"]
        finally:
            journal.close()

    def decisions(self, node: str, rule: str) -> list[Any]:
        journal = Journal.in_state_dir(self.configs[node].daemon.state_dir)
        try:
            return [e for e in journal.recent(500) if e.rule == rule]
        finally:
            journal.close()

    def drain_updates(self) -> int:
        """How many times slurmctld set a trainwarden drain reason on node-b (its own log)."""
        log = (self.slurm.root / "log" / "slurmctld.log").read_text(errors="replace")
        return sum(
            1 for line in log.splitlines() if "node-b" in line and "trainwarden:" in line and "reason" in line
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = servers_skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("cluster")
    token = root / "token"
    token.write_text("cluster-test-token\n", encoding="utf-8")
    slurm = start_two_node_slurm(NODES)
    ports = {node: free_port() for node in NODES}
    urls = {node: f"http://{NODES[node]}:{ports[node]}" for node in NODES}
    configs = {
        node: cluster_daemon_config(root, node, ports[node], token, slurm.conf, urls["node-a"])
        for node in NODES
    }
    am_ports = [free_port(), free_port()]
    prometheus = start_prometheus(
        root / "prometheus",
        {node: f"{NODES[node]}:{ports[node]}" for node in NODES},
        [f"127.0.0.1:{port}" for port in am_ports],
    )
    ctl = root / "ctl"
    state = Cluster(root, slurm, prometheus, am_ports, configs, {}, urls, token, ctl)
    jobs: list[Any] = []
    try:
        for node in NODES:
            state.start_daemon(node)
        jobs = start_job_on_nodes(root, {n: configs[n].daemon.runtime_dir for n in NODES}, ctl)
        wait_until(
            lambda: len(query(prometheus, "job_node:trainwarden_train_step_seconds:p50")) == 2,
            180,
            "step times from both nodes in Prometheus",
        )
        yield state
    finally:
        stop_job(jobs, ctl)
        for daemon in state.daemons.values():
            daemon.stop()
        prometheus.stop()
        stop_slurm(slurm)


def test_straggler_node_is_drained_once_and_its_recovery_resolves(cluster: Cluster) -> None:
    """Node B slows down: with a clustered Alertmanager pair the straggler alert drains node-b in Slurm
    exactly once (the primary acts, the standby defers), journaled once; B recovers and the resolved
    alert is handled; then a job-wide stall fires the stall alert and a killed daemon the daemon-down
    alert, each delivered to the primary and journaled there."""
    config = alertmanager_config(cluster.root, cluster.urls, cluster.token)
    ams = start_alertmanagers(cluster.root / "ha", config, cluster.am_ports, clustered=True)
    try:
        (cluster.ctl / "slow-node-b").touch()
        wait_until(
            lambda: "DRAIN" in node_field(cluster.slurm, "node-b", "State"), 240, "node-b drained in Slurm"
        )
        assert node_field(cluster.slurm, "node-b", "Reason").startswith("trainwarden:")
        assert "DRAIN" not in node_field(cluster.slurm, "node-a", "State")
        [drain] = cluster.taken("node-a", "straggler_node")
        assert drain.subject == "job=cluster,node=node-b"
        assert drain.result == "applied"
        assert cluster.taken("node-b", "straggler_node") == []
        assert (
            cluster.metric("node-b", "trainwarden_webhook_alerts_total", status="firing", result="deferred")
            >= 1
        )
        assert cluster.drain_updates() == 1

        (cluster.ctl / "slow-node-b").unlink()
        wait_until(
            lambda: (
                cluster.metric(
                    "node-a", "trainwarden_webhook_alerts_total", status="resolved", result="resolved"
                )
                >= 1
            ),
            240,
            "the resolved straggler alert handled on node-a",
        )
        assert cluster.daemons["node-a"].status()["webhook"]["firing"] == []
        assert len(cluster.taken("node-a", "straggler_node")) == 1
        assert cluster.drain_updates() == 1

        (cluster.ctl / "stall").touch()
        wait_until(lambda: firing(cluster.prometheus, "TrainwardenJobStalled"), 180, "stall alert firing")
        wait_until(lambda: cluster.decisions("node-a", "job_stalled"), 120, "stall journaled on node-a")
        (cluster.ctl / "stall").unlink()

        cluster.daemons.pop("node-b").stop()
        wait_until(lambda: firing(cluster.prometheus, "TrainwardenDaemonDown"), 120, "daemon-down firing")
        wait_until(lambda: cluster.decisions("node-a", "daemon_down"), 120, "daemon-down journaled on node-a")
        [down] = cluster.decisions("node-a", "daemon_down")
        assert down.subject == "node=node-b"
    finally:
        for am in ams:
            am.stop()
        if "node-b" not in cluster.daemons:
            cluster.start_daemon("node-b")


def test_unclustered_alertmanagers_deliver_twice_and_node_b_is_drained_once(cluster: Cluster) -> None:
    """Two Alertmanagers that do not gossip both deliver the straggler alert; the primary drains node-b once
    and counts the second delivery as a duplicate."""
    cluster.slurm.scontrol("update", "NodeName=node-b", "State=RESUME")
    wait_until(lambda: "DRAIN" not in node_field(cluster.slurm, "node-b", "State"), 30, "node-b resumed")
    cluster.fresh_daemons("unclustered")
    # The restarts (and the previous test's stall) leave uneven step windows for a few seconds.
    wait_until(cluster.quiet, 120, "step times even again, no straggler alert")
    before_updates = cluster.drain_updates()
    before_taken = len(cluster.taken("node-a", "straggler_node"))
    config = alertmanager_config(cluster.root, cluster.urls, cluster.token)
    ams = start_alertmanagers(cluster.root / "pair", config, cluster.am_ports, clustered=False)
    try:
        (cluster.ctl / "slow-node-b").touch()
        wait_until(
            lambda: "DRAIN" in node_field(cluster.slurm, "node-b", "State"), 240, "node-b drained again"
        )
        wait_until(
            lambda: (
                cluster.metric(
                    "node-a", "trainwarden_webhook_alerts_total", status="firing", result="duplicate"
                )
                >= 1
            ),
            60,
            "the second Alertmanager's delivery counted as a duplicate",
        )
        assert cluster.drain_updates() == before_updates + 1
        assert len(cluster.taken("node-a", "straggler_node")) == before_taken + 1
    finally:
        (cluster.ctl / "slow-node-b").unlink(missing_ok=True)
        for am in ams:
            am.stop()
