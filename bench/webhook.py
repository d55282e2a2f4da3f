"""The Alertmanager webhook receiver under load: answer time at 1,000 alerts/s and sustained rate.

Starts a real daemon (in this process, HTTP on loopback, the journal in a temp dir) whose
webhook maps the alert to a rule the policy observes (journaled, no healer run), then:

1. fresh: `--distinct` new alerts in notifications of `--batch`, posted at once: how fast they
   are claimed and decided (each one a policy decision and a journal entry);
2. paced: those notifications resent at `--rate` alerts/s for `--seconds` (what Alertmanager
   pairs and retries send: every alert a repeat), from `--senders` keep-alive connections;
   answer time of each POST (p50/p99/max) against GET /healthz answered at the same pace in the
   same run (the HTTP baseline), alerts/s answered and handled.

Then checks the journal: every distinct alert was decided once, none twice.

Usage: .venv/bin/python bench/webhook.py [--rate 1000] [--batch 10] [--seconds 10] [--senders 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster_support import alert, payload
from trainwarden.config import config_from_dict
from trainwarden.daemon.app import Daemon
from trainwarden.journal import Journal
from trainwarden.plugins import plugin_groups


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def body_for(index: int, batch: int) -> bytes:
    alerts = [
        alert(
            fingerprint=f"{index * batch + i + 1:x}",
            starts_at=f"2026-12-01T10:00:00.{index * batch + i:06d}Z",  # one occurrence per alert
            labels={"node": f"node-{(index * batch + i) % 997}"},
        )
        for i in range(batch)
    ]
    return json.dumps(payload(*alerts)).encode()


class Sender(threading.Thread):
    """Posts its share of the notifications on one keep-alive connection, on a fixed schedule."""

    def __init__(self, host: str, port: int, jobs: list[tuple[float, str, bytes]]) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.jobs = host, port, jobs
        self.times: dict[str, list[float]] = {"POST": [], "GET": []}
        self.statuses: dict[int, int] = {}

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        for due, method, body in self.jobs:
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter()
            if method == "POST":
                conn.request("POST", "/api/v1/alerts", body=body, headers=headers)
            else:
                conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            self.times[method].append(time.perf_counter() - start)
            self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        conn.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tw-bench-webhook-"))
    data: dict[str, Any] = {
        "daemon": {"listen": "127.0.0.1:0", "runtime_dir": str(tmp / "run"), "state_dir": str(tmp / "state")},
        "policy": {"routes": {"straggler_node": []}, "max_actions_per_window": 1_000_000},
        "webhook": {"rules": {"TrainwardenStragglerNode": "straggler_node"}, "queue_alerts": 1_000_000},
    }
    daemon = Daemon(config_from_dict(data, plugin_groups()))
    daemon.start()
    route, _ = daemon.routes.resolve("POST", "/api/v1/alerts")
    webhook = route.__self__  # type: ignore[union-attr]
    host, port = daemon.address
    try:
        # 1. fresh alerts: each distinct alert claimed and decided by the policy once
        groups = args.distinct // args.batch
        bodies = [body_for(i, args.batch) for i in range(groups)]
        fresh = [
            Sender(host, port, [(0.0, "POST", b) for b in bodies[s :: args.senders]])
            for s in range(args.senders)
        ]
        t0 = time.perf_counter()
        for sender in fresh:
            sender.start()
        for sender in fresh:
            sender.join()
        webhook.join()
        fresh_s = time.perf_counter() - t0
        # 2. paced: Alertmanager resending those groups (every alert a repeat) at `rate` alerts/s
        notifications = int(args.rate * args.seconds / args.batch)
        interval = args.batch / args.rate
        start = time.perf_counter() + 0.5
        jobs: list[list[tuple[float, str, bytes]]] = [[] for _ in range(args.senders)]
        for n in range(notifications):
            due = start + n * interval
            jobs[n % args.senders].append((due, "POST", bodies[n % groups]))
            jobs[(n + 1) % args.senders].append((due + interval / 2, "GET", b""))
        senders = [Sender(host, port, j) for j in jobs]
        t0 = time.perf_counter()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        sent_s = time.perf_counter() - t0
        webhook.join()
        handled_s = time.perf_counter() - t0
        posts = [t for s in senders for t in s.times["POST"]]
        gets = [t for s in senders for t in s.times["GET"]]
        statuses: dict[int, int] = {}
        for sender in senders:
            for code, count in sender.statuses.items():
                statuses[code] = statuses.get(code, 0) + count
        posted = notifications * args.batch
        paced = {
            "alerts_per_s_offered": args.rate,
            "alerts_posted": posted,
            "alerts_per_s_answered": posted / sent_s,
            "alerts_per_s_handled": posted / handled_s,
            "post_p50_ms": 1000 * statistics.median(posts),
            "post_p99_ms": 1000 * quantile(posts, 0.99),
            "post_max_ms": 1000 * max(posts),
            "healthz_p50_ms": 1000 * statistics.median(gets),
            "healthz_p99_ms": 1000 * quantile(gets, 0.99),
            "statuses": statuses,
        }
        first = {
            "alerts": groups * args.batch,
            "seconds": fresh_s,
            "alerts_per_s": groups * args.batch / fresh_s,
        }
    finally:
        daemon.stop()
    journal = Journal.in_state_dir(tmp / "state")
    entries = [e for e in journal.since(0) if e.rule == "straggler_node"]
    keys = [e.finding_key for e in entries]
    registry = daemon.registry
    duplicates = registry.get_sample_value(
        "trainwarden_webhook_alerts_total", {"status": "firing", "result": "duplicate"}
    )
    journal.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "fresh": first,
        "paced_repeats": paced,
        "decisions": len(entries),
        "decided_twice": len(keys) - len(set(keys)),
        "duplicates_counted": duplicates,
        "expected_decisions": groups * args.batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="alerts per second offered")
    parser.add_argument("--batch", type=int, default=10, help="alerts per notification")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--distinct", type=int, default=200, help="distinct alerts (each decided once)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
