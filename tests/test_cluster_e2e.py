"""Two nodes on this machine, end to end on real parts: the cluster loop from a slow node to a Slurm drain.

Node A (127.0.0.2) and node B (127.0.0.3) each run a trainwarden daemon; a torchrun job spans
them (c10d rendezvous, gloo), each node's rank reporting to its own daemon; a real Prometheus
scrapes both with the shipped rules (intervals shortened, see `cluster_support.shortened_rules`);
two real Alertmanagers run the shipped example config; a real Slurm knows both node names.
Daemon A is the primary actor, daemon B its standby.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
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
    query,
    servers_skip_reason,
    start_alertmanagers,
    start_job_on_nodes,
    start_prometheus,
    start_two_node_slurm,
    stop_job,
    stop_slurm,
)
from exported_metrics import fixture_daemon
from support import free_port, wait_until
from trainwarden.config import Config
from trainwarden.daemon.app import Daemon

sys.path.append(str(Path(__file__).resolve().parent.parent))  # dashboards/ is at the repo root
from dashboards.queries import all_panel_queries

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
    started: float

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
        ratio = "job_node:trainwarden_train_step_seconds:ratio_to_job_p50{job='cluster'}"
        ratios = query(self.prometheus, ratio)
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

    def decisions(self, node: str, rule: str, subject: str | None = None) -> list[Any]:
        """Journal entries of `rule` (about `subject`; the fixture daemon's own job also stalls)."""
        journal = Journal.in_state_dir(self.configs[node].daemon.state_dir)
        try:
            return [
                e
                for e in journal.recent(500)
                if e.rule == rule and (subject is None or subject in e.subject.split(","))
            ]
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
    ctl = root / "ctl"
    jobs: list[Any] = []
    daemons: dict[str, Daemon] = {}
    with contextlib.ExitStack() as stack:
        slurm = start_two_node_slurm(NODES)
        stack.callback(stop_slurm, slurm)
        ports = {node: free_port() for node in NODES}
        urls = {node: f"http://{NODES[node]}:{ports[node]}" for node in NODES}
        configs = {
            node: cluster_daemon_config(
                root, node, ports[node], token, slurm.conf, urls["node-a"], local_stall=True
            )
            for node in NODES
        }
        am_ports = [free_port(), free_port()]
        (root / "gpu-node").mkdir()
        # A third daemon on the NVML and InfiniBand fixtures, for the GPU and fabric panels.
        gpu_url = stack.enter_context(fixture_daemon(root / "gpu-node"))
        targets = {node: f"{NODES[node]}:{ports[node]}" for node in NODES}
        targets["node-gpu"] = gpu_url.removeprefix("http://")
        prometheus = start_prometheus(root / "prometheus", targets, [f"127.0.0.1:{p}" for p in am_ports])
        stack.callback(prometheus.stop)
        state = Cluster(root, slurm, prometheus, am_ports, configs, daemons, urls, token, ctl, time.time())
        stack.callback(lambda: [daemon.stop() for daemon in list(daemons.values())])
        for node in NODES:
            state.start_daemon(node)
        jobs = start_job_on_nodes(root, {n: configs[n].daemon.runtime_dir for n in NODES}, ctl)
        stack.callback(stop_job, jobs, ctl)
        wait_until(
            lambda: len(query(prometheus, "job_node:trainwarden_train_step_seconds:p50{job='cluster'}")) == 2,
            180,
            "step times from both nodes in Prometheus",
        )
        yield state


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
            lambda: "DRAIN" in cluster.slurm.node_field("State", "node-b"), 240, "node-b drained in Slurm"
        )
        assert cluster.slurm.node_field("Reason", "node-b").startswith("trainwarden:")
        assert "DRAIN" not in cluster.slurm.node_field("State", "node-a")
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
        still = [
            a
            for a in cluster.daemons["node-a"].status()["webhook"]["firing"]
            if a["alertname"] == "TrainwardenStragglerNode"
        ]
        assert still == []
        assert len(cluster.taken("node-a", "straggler_node")) == 1
        assert cluster.drain_updates() == 1

        (cluster.ctl / "stall").touch()
        wait_until(
            lambda: [
                a
                for a in firing(cluster.prometheus, "TrainwardenJobStalled")
                if a["labels"]["job"] == "cluster"
            ],
            180,
            "the stall alert firing for job cluster (the fixture daemon's job stalls too)",
        )
        wait_until(
            lambda: cluster.decisions("node-a", "job_stalled", "job=cluster"),
            120,
            "stall journaled on node-a",
        )
        wait_until(
            lambda: cluster.decisions("node-a", "stall", "job=cluster"),
            120,
            "node-a's own stall rule fired too",
        )
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
    wait_until(lambda: "DRAIN" not in cluster.slurm.node_field("State", "node-b"), 30, "node-b resumed")
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
            lambda: "DRAIN" in cluster.slurm.node_field("State", "node-b"), 240, "node-b drained again"
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


PROVIDED = {
    "training",
    "recording_rules",
    "gpu",
    "infiniband",
    "checkpoints_volume",
    "two_checkpoints",
    "finding",
}


def test_every_dashboard_panel_has_data_after_the_scenario(cluster: Cluster) -> None:
    """Each panel query of each shipped dashboard, run over the scenario's time range against its
    Prometheus, returns data (GPU, InfiniBand and volume panels from a third daemon on the fixtures)."""
    wait_until(
        lambda: (
            query(cluster.prometheus, "count(job:trainwarden_train_checkpoint_interval_seconds:observed) > 0")
            != []
        ),
        60,
        "a second checkpoint, so the job's interval is known",
    )
    empty = []
    for panel in all_panel_queries():
        if not panel.requires <= PROVIDED:
            continue
        answer = requests.get(
            cluster.prometheus.url + "/api/v1/query_range",
            params={
                "query": panel.rendered(rate_interval="15s"),
                "start": cluster.started,
                "end": time.time(),
                "step": 2,
            },
            timeout=30,
        ).json()
        assert answer["status"] == "success", (panel, answer)
        if not answer["data"]["result"]:
            empty.append(f"{panel.dashboard} / {panel.panel} / {panel.ref_id}")
    assert empty == []
