"""Fault to action through the cluster path, stage by stage, against the node-local path.

Builds the two-node loop of tests/test_cluster_e2e.py on this machine (two daemons on 127.0.0.2
and 127.0.0.3, a torchrun job across them, Prometheus with the shipped rules at the test's short
intervals, two clustered Alertmanagers with the shipped example config, a two-node Slurm) and:

1. straggler: touches node B's slow file and timestamps each stage: the alert pending in
   Prometheus (its activeAt), firing, present in Alertmanager, decided by daemon A (journal
   time), drain applied (journal finish), node-b DRAIN in Slurm;
2. stall, both ways at once: freezes every rank and times daemon A's own stall rule (the
   node-local path) and the TrainwardenJobStalled alert journaled by daemon A (the cluster path).

Prometheus polls are 0.2 s apart, so stage times carry up to 0.2 s of polling.

Usage: .venv/bin/python bench/cluster_path.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster_support import (
    NODES,
    alertmanager_config,
    cluster_daemon_config,
    firing,
    query,
    start_alertmanagers,
    start_job_on_nodes,
    start_prometheus,
    start_two_node_slurm,
    stop_job,
    stop_slurm,
)
from support import free_port
from trainwarden.daemon.app import Daemon
from trainwarden.journal import Journal

POLL = 0.2


def poll(what: str, check: Any, timeout: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(POLL)
    raise SystemExit(f"timed out waiting for {what}")


def journal_entry(state_dir: Path, rule: str) -> Any:
    journal = Journal.in_state_dir(state_dir)
    try:
        entries = [e for e in journal.since(0) if e.rule == rule]
    finally:
        journal.close()
    return entries[0] if entries else None


def rfc3339(text: str) -> float:
    from datetime import datetime  # noqa: PLC0415

    return datetime.fromisoformat(text).timestamp()


def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tw-bench-cluster-"))
    token = root / "token"
    token.write_text("bench-token\n", encoding="utf-8")
    slurm = start_two_node_slurm(NODES)
    ports = {node: free_port() for node in NODES}
    urls = {node: f"http://{NODES[node]}:{ports[node]}" for node in NODES}
    configs = {
        node: cluster_daemon_config(
            root, node, ports[node], token, slurm.conf, urls["node-a"], local_stall=True
        )
        for node in NODES
    }
    am_ports = [free_port(), free_port()]
    prometheus = start_prometheus(
        root / "prometheus",
        {node: f"{NODES[node]}:{ports[node]}" for node in NODES},
        [f"127.0.0.1:{port}" for port in am_ports],
    )
    daemons = {node: Daemon(configs[node]) for node in NODES}
    for daemon in daemons.values():
        daemon.start()
    ams = start_alertmanagers(root / "ha", alertmanager_config(root, urls, token), am_ports, clustered=True)
    ctl = root / "ctl"
    jobs = start_job_on_nodes(root, {n: configs[n].daemon.runtime_dir for n in NODES}, ctl)
    state_a = configs["node-a"].daemon.state_dir
    try:
        poll(
            "step times of both nodes",
            lambda: len(query(prometheus, "job_node:trainwarden_train_step_seconds:p50")) == 2,
        )
        time.sleep(20)  # a steady baseline in the 15 s rate windows
        t0 = time.time()
        (ctl / "slow-node-b").touch()
        alert = poll(
            "straggler pending",
            lambda: next(
                (
                    a
                    for a in requests.get(prometheus.url + "/api/v1/alerts", timeout=10).json()["data"][
                        "alerts"
                    ]
                    if a["labels"]["alertname"] == "TrainwardenStragglerNode"
                ),
                None,
            ),
        )
        pending = rfc3339(alert["activeAt"])
        poll("straggler firing", lambda: firing(prometheus, "TrainwardenStragglerNode"))
        fired = time.time()
        poll(
            "alert in Alertmanager",
            lambda: requests.get(
                ams[0].url + "/api/v2/alerts",
                params={"filter": 'alertname="TrainwardenStragglerNode"'},
                timeout=10,
            ).json(),
        )
        in_am = time.time()
        entry = poll(
            "drain journaled", lambda: (e := journal_entry(state_a, "straggler_node")) and e.finished and e
        )
        poll("node-b DRAIN", lambda: "DRAIN" in slurm.node_field("State", "node-b"))
        drained = time.time()
        straggler = {
            "fault_to_pending_s": pending - t0,
            "pending_to_firing_s": fired - pending,
            "firing_to_alertmanager_s": in_am - fired,
            "alertmanager_to_webhook_decision_s": entry.time - in_am,
            "decision_to_drain_applied_s": entry.finished - entry.time,
            "fault_to_drain_applied_s": entry.finished - t0,
            "fault_to_slurm_drain_seen_s": drained - t0,
            "result": entry.result,
        }
        (ctl / "slow-node-b").unlink()
        time.sleep(20)
        t0 = time.time()
        (ctl / "stall").touch()
        local = poll("local stall", lambda: journal_entry(state_a, "stall"), 300)
        cluster = poll("cluster stall", lambda: journal_entry(state_a, "job_stalled"), 300)
        stall = {
            "local_rule_fault_to_decision_s": local.time - t0,
            "cluster_alert_fault_to_decision_s": cluster.time - t0,
            "ratio_cluster_to_local": (cluster.time - t0) / (local.time - t0),
        }
        (ctl / "stall").unlink()
    finally:
        stop_job(jobs, ctl)
        for am in ams:
            am.stop()
        for daemon in daemons.values():
            daemon.stop()
        prometheus.stop()
        stop_slurm(slurm)
        shutil.rmtree(root, ignore_errors=True)
    return {
        "intervals": {
            "scrape_and_eval_s": 1,
            "rule_for_s": 3,
            "rate_window_s": 15,
            "stall_floor_cluster_s": 5,
            "stall_floor_local_s": 20,
            "group_wait_s": 1,
            "group_interval_s": 2,
            "resend_delay_s": 1,
            "am_peer_timeout_s": 3,
        },
        "straggler": straggler,
        "stall": stall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
