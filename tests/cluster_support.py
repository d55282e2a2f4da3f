"""Helpers for the webhook and cluster tests: Alertmanager payloads, a recording drain command,
daemon configs, and (further down) real Prometheus / Alertmanager servers on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

import slurm_cluster
from support import free_port
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


# --- a two-node Slurm: one slurmctld, a slurmd for each node name --------------------------------


def start_two_node_slurm(nodes: dict[str, str], timeout: float = 60.0) -> slurm_cluster.SlurmCluster:
    """munged, slurmctld and one slurmd per {node name: loopback address}; `node` is the first name."""
    return slurm_cluster.start_slurm_cluster(timeout, nodes=nodes)


def stop_slurm(cluster: slurm_cluster.SlurmCluster) -> None:
    """Stop every daemon of the cluster and sweep what it started, then remove its directory."""
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


# --- Prometheus and Alertmanager on loopback ----------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "prometheus"
AM_EXAMPLE = PROMETHEUS_DIR / "alertmanager.example.yml"
PROMETHEUS_BIN = "prometheus"
ALERTMANAGER_BIN = "prometheus-alertmanager"


def servers_skip_reason() -> str | None:
    """Why real Prometheus/Alertmanager cannot run here, or None."""
    missing = [name for name in (PROMETHEUS_BIN, ALERTMANAGER_BIN) if shutil.which(name) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install prometheus prometheus-alertmanager)"
    return None


class Server:
    """One server process with its log file, stopped (and waited for) by `stop`."""

    def __init__(self, name: str, argv: list[str], log: Path, url: str) -> None:
        self.name = name
        self.log = log
        self.url = url
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for GET /-/ready to answer 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        """The end of the server's log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def shortened_rules(root: Path) -> list[Path]:
    """The shipped rule files with the test's short intervals: `for:` 3 s, 2 m rate windows and offsets 15 s,
    the stall floor 5 s instead of 60 s. The expressions are otherwise the shipped ones."""
    out = []
    for source in sorted(PROMETHEUS_DIR.glob("*.rules.yml")):
        text = source.read_text(encoding="utf-8")
        text = re.sub(r"for: \d+[mh]", "for: 3s", text)
        text = text.replace("[2m]", "[15s]").replace("offset 2m", "offset 15s").replace("), 60)", "), 5)")
        target = root / source.name
        target.write_text(text, encoding="utf-8")
        out.append(target)
    return out


def start_prometheus(root: Path, targets: dict[str, str], alertmanagers: list[str]) -> Server:
    """Prometheus scraping each daemon every second (`node` label from the target list) with the rules."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in shortened_rules(root)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]},
        "scrape_configs": [
            {
                "job_name": "trainwarden",
                "honor_labels": True,  # the daemon's `job` label is the training job's
                "static_configs": [
                    {"targets": [address], "labels": {"node": node}} for node, address in targets.items()
                ],
            }
        ],
    }
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    argv = [
        PROMETHEUS_BIN,
        f"--config.file={path}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--rules.alert.resend-delay=1s",
        "--rules.alert.for-grace-period=1s",
    ]
    server = Server("prometheus", argv, root / "prometheus.log", f"http://127.0.0.1:{port}")
    server.wait_ready()
    return server


def alertmanager_config(root: Path, urls: dict[str, str], token_file: Path) -> Path:
    """The shipped example with this machine's daemon URLs, the test's token and short group timers."""
    config = yaml.safe_load(AM_EXAMPLE.read_text(encoding="utf-8"))
    config["route"].update(group_wait="1s", group_interval="2s", repeat_interval="1h")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            for node, url in urls.items():
                hook["url"] = hook["url"].replace(f"http://{node}:9871", url)
            hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    path = root / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_alertmanagers(root: Path, config: Path, ports: list[int], *, clustered: bool) -> list[Server]:
    """Two Alertmanagers on loopback, gossiping with each other when `clustered`."""
    gossip = [free_port() for _ in ports]
    servers = []
    for index, port in enumerate(ports):
        home = root / f"am{index}"
        home.mkdir(parents=True, exist_ok=True)
        argv = [
            ALERTMANAGER_BIN,
            f"--config.file={config}",
            f"--storage.path={home}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        if clustered:
            argv += [
                f"--cluster.listen-address=127.0.0.1:{gossip[index]}",
                f"--cluster.advertise-address=127.0.0.1:{gossip[index]}",
                *(f"--cluster.peer=127.0.0.1:{g}" for i, g in enumerate(gossip) if i != index),
                "--cluster.settle-timeout=5s",
                "--cluster.peer-timeout=3s",
                "--cluster.gossip-interval=100ms",
                "--cluster.pushpull-interval=2s",
            ]
        else:
            argv.append("--cluster.listen-address=")
        servers.append(Server(f"alertmanager{index}", argv, home / "log", f"http://127.0.0.1:{port}"))
    for server in servers:
        server.wait_ready()
    return servers


def firing(prometheus: Server, alertname: str) -> list[dict[str, Any]]:
    """Alerts of that name Prometheus holds as firing now."""
    data = requests.get(prometheus.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in data if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


def query(prometheus: Server, expr: str) -> list[dict[str, Any]]:
    """Instant query result vector."""
    answer = requests.get(prometheus.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


@contextlib.contextmanager
def stopping(*servers: Server) -> Iterator[None]:
    """Stop the servers however the block ends."""
    try:
        yield
    finally:
        for server in servers:
            server.stop()


# --- a torchrun job over two "nodes" ------------------------------------------------------------

WORKER = '''\
"""One rank of the two-node test job: local SGD steps, a gloo all-reduce every 10 steps.

Steps are local (each rank trains on its own data), so a slow node shows in its own step times
the way a straggler's compute does; the all-reduce (reported as the eval phase, where the fast
node waits) also carries rank 0's view of the control files, so every rank stalls and stops at
the same step.
"""
import os, time
from pathlib import Path
import torch
import torch.distributed as dist
from trainwarden.client.reporter import Reporter

ctl = Path(os.environ["CLUSTER_CTL"])
node = os.environ["CLUSTER_NODE"]
dist.init_process_group("gloo")
reporter = Reporter.from_env(job="cluster")
torch.manual_seed(dist.get_rank())
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
step = 0
while True:
    x = torch.randn(16, 8)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    time.sleep(0.05 + (0.4 if (ctl / f"slow-{node}").exists() else 0.0))
    reporter.step(step, loss=float(loss))
    step += 1
    if step % 100 == 0:
        with reporter.phase("checkpoint"):
            path = ctl / f"ckpt-{node}-{dist.get_rank()}.pt"
            torch.save({"model": model.state_dict(), "step": step}, path)
        reporter.checkpoint_saved(step, path)
    if step % 10 == 0:
        with reporter.phase("eval"):
            stall, stop = (ctl / "stall").exists(), (ctl / "stop").exists()
            flags = torch.tensor([float(stall), float(stop), loss.item()])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        while flags[0] > 0 and (ctl / "stall").exists():
            time.sleep(0.05)  # every rank inside a step, none finishing one: a job-wide stall
        if flags[1] > 0:
            break
reporter.close()
dist.barrier()
dist.destroy_process_group()
'''


def start_job_on_nodes(root: Path, nodes: dict[str, Path], ctl: Path) -> list[subprocess.Popen[bytes]]:
    """One torchrun per node (c10d rendezvous, one gloo rank each), ranks reporting to that node's
    daemon through its socket; `nodes` maps node name -> the daemon's runtime dir."""
    script = root / "cluster_worker.py"
    script.write_text(WORKER, encoding="utf-8")
    ctl.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for index, (node, runtime_dir) in enumerate(nodes.items()):
        env = {
            **os.environ,
            "CLUSTER_CTL": str(ctl),
            "CLUSTER_NODE": node,
            "TRAINWARDEN_SOCKET": str(runtime_dir / "client.sock"),
            "TRAINWARDEN_CONTROL_DIR": str(runtime_dir / "control"),
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
        }
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={index}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=twcluster",
            "--max-restarts=0",
            str(script),
        ]
        with (root / f"job-{node}.log").open("ab") as out:
            procs.append(
                subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )
    return procs


def stop_job(procs: list[subprocess.Popen[bytes]], ctl: Path) -> None:
    """Ask the job to stop at its next all-reduce; kill what is still running after 30 s."""
    (ctl / "stall").unlink(missing_ok=True)
    (ctl / "stop").touch()
    deadline = time.monotonic() + 30
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# --- the two-node loop's daemons ------------------------------------------------------------------

NODES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}


def cluster_daemon_config(
    root: Path,
    node: str,
    port: int,
    token: Path,
    slurm_conf: Path,
    primary: str,
    *,
    local_stall: bool = False,
) -> Config:
    """Daemon config of one node of the loop: node-a the primary actor, node-b its standby; the
    straggler alert drains through Slurm, stall and daemon-down alerts are journaled (observed).
    The daemons' own rules only observe (with `local_stall`, their stall rule is the one kept on)."""
    webhook: dict[str, Any] = {
        "token_file": str(token),
        "rules": {
            "TrainwardenStragglerNode": "straggler_node",
            "TrainwardenJobStalled": "job_stalled",
            "TrainwardenDaemonDown": "daemon_down",
        },
    }
    if node == "node-b":
        webhook.update(actor="standby", primary_url=primary)
    data: dict[str, Any] = {
        "daemon": {
            "listen": f"{NODES[node]}:{port}",
            "node_name": node,
            "runtime_dir": str(root / node / "run"),
            "state_dir": str(root / node / "state"),
        },
        "policy": {
            "actions_enabled": True,
            "routes": {
                "straggler_node": ["slurm_drain"],
                "job_stalled": [],
                "daemon_down": [],
                "straggler": [],
            },
            # The daemons' own rules only observe here: this is about the cluster path.
            "ladders": {"transient": [], "persistent": [], "planned": []},
        },
        "webhook": webhook,
        "healers": {"slurm_drain": {"enabled": True, "slurm_conf": str(slurm_conf), "max_drained_nodes": 1}},
    }
    if not local_stall:
        data["rules"] = {"stall": {"enabled": False}}
    return config_from_dict(data, plugin_groups())
