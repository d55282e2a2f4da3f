"""The real `trainwarden daemon` on FakeNvml (TRAINWARDEN_NVML_FIXTURE) and fixture trees, over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon_support import Metrics, daemon_argv, daemon_env, parse_metrics, stop_process
from gpu_support import FIXTURES
from support import free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

HOST = FIXTURES / "hosts" / "vm_psi"


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    url: str
    kmsg: Path
    log: Path

    def metrics(self) -> Metrics:
        return parse_metrics(self.text())

    def text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return str(response.read().decode())

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))


def start_node(tmp_path: Path, fixture: str) -> Node:
    dev = tmp_path / "dev"
    dev.mkdir()
    kmsg = dev / "kmsg"
    kmsg.write_text("6,1,1,-;Linux version (history before the daemon started)\n")
    inspector = tmp_path / "nccl"
    inspector.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f"[paths]\ndevfs = '{dev}'\n\n"
        "[collectors.gpu]\ninterval_seconds = 0.5\nevent_poll_ms = 100\n\n"
        "[collectors.kmsg]\ninterval_seconds = 0.5\n\n"
        "[collectors.xid]\ninterval_seconds = 0.5\n\n"
        f"[collectors.nccl_inspector]\nenabled = true\ndirectory = '{inspector}'\ninterval_seconds = 0.5\n\n"
        f"[collectors.nccl_ras]\nenabled = true\naddress = '127.0.0.1:{free_port()}'\n"
        "interval_seconds = 0.5\n"
    )
    port = free_port()
    log = tmp_path / "daemon.log"
    cmd = daemon_argv(
        tmp_path,
        config=config,
        listen=f"127.0.0.1:{port}",
        procfs=HOST / "proc",
        sysfs=FIXTURES / "infiniband" / "ndr_4port" / "sys",
    )
    env = daemon_env(TRAINWARDEN_NVML_FIXTURE=fixture)
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    node = Node(proc, f"http://127.0.0.1:{port}", kmsg, log)

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return node.value("trainwarden_collector_success", collector="xid") == 1
        except OSError:
            return False

    wait_until(ready, 30.0, "the daemon to serve its first collection")
    assert proc.poll() is None, log.read_text()
    return node


def stop(node: Node) -> None:
    stop_process(node.proc)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    running = start_node(tmp_path, "h100-sxm-8gpu")
    yield running
    stop(running)


def test_daemon_exports_gpus_ports_and_kernel_xids(node: Node) -> None:
    """On the H100 snapshot all 8 GPUs and IB ports are exported; an XID written to kmsg becomes a count."""
    metrics = node.metrics()
    ups = {dict(labels)["gpu"]: v for (name, labels), v in metrics.items() if name == "trainwarden_gpu_up"}
    assert ups == {str(i): 1 for i in range(8)}
    assert metrics[("trainwarden_collector_success", (("collector", "gpu"),))] == 1
    assert metrics[("trainwarden_infiniband_port_up", (("device", "mlx5_0"), ("port", "1")))] == 1
    assert metrics[("trainwarden_collector_success", (("collector", "nccl_inspector"),))] == 1
    with node.kmsg.open("a") as handle:
        handle.write(
            "4,2,2,-;NVRM: Xid (PCI:0000:db:00): 79, pid=41008, name=python, GPU has fallen off the bus.\n"
        )
    wait_until(
        lambda: node.value("trainwarden_gpu_xid_errors_total", gpu="7", xid="79") == 1,
        30.0,
        "XID 79 on GPU 7",
    )
    assert node.value("trainwarden_gpu_xid_actions_total", gpu="7", action="reboot") == 1
    assert node.value("trainwarden_kmsg_records_total") == 1
    with urllib.request.urlopen(node.url + "/status", timeout=5) as response:
        collectors = json.loads(response.read())["collectors"]
    assert len(collectors["gpu"]["detail"]["gpus"]) == 8
    assert collectors["xid"]["detail"]["recent"][0]["xid"] == 79


def test_daemon_without_a_driver_reports_gpu_unavailable(tmp_path: Path) -> None:
    """With the no-driver snapshot the daemon runs on, gpu collector_success is 0, with one log line."""
    running = start_node(tmp_path, "no-driver")
    try:
        wait_until(
            lambda: running.value("trainwarden_collector_success", collector="gpu") == 0,
            30.0,
            "gpu collector success 0",
        )
        assert running.value("trainwarden_gpu_up", gpu="0", uuid="", model="") is None
        assert running.value("trainwarden_collector_success", collector="infiniband") == 1
    finally:
        stop(running)
    lines = [line for line in running.log.read_text().splitlines() if "NVML" in line]
    assert len(lines) == 1, lines
    assert "library not found" in lines[0]


MINE = (
    "trainwarden_gpu_",
    "trainwarden_infiniband_",
    "trainwarden_nccl_",
    "trainwarden_kmsg_",
    "trainwarden_kernel_",
)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_promtool_finds_no_naming_problem_in_these_series(node: Node) -> None:
    """`promtool check metrics` (Prometheus' linter) reports nothing about the GPU/XID/interconnect series."""
    with node.kmsg.open("a") as handle:
        handle.write("4,3,3,-;NVRM: Xid (PCI:0000:18:00): 48, An uncorrectable double bit error (DBE)\n")
    wait_until(lambda: node.value("trainwarden_gpu_xid_errors_total", gpu="0", xid="48") == 1, 30.0, "XID 48")
    text = node.text()
    assert "trainwarden_nccl_ras_reachable 0.0" in text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(MINE)]
    assert complaints == []
