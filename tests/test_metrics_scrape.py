"""A full scrape of the real daemon, linted by promtool and compared with docs/METRICS.md.

Full means every kind of series a node can have at once: the host collectors on a fixture tree,
the NVML fixture's eight GPUs, InfiniBand ports, a connected training client, an XID from the
kernel log, a firing finding and the policy's (dry-run) action on it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_support import daemon_argv, daemon_env
from support import free_port, wait_until
from trainwarden.client import Reporter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
METRICS_DOC = ROOT / "docs" / "METRICS.md"


@dataclass
class Scrape:
    text: str
    status: dict[str, object]
    log: Path

    def value(self, name: str, **labels: str) -> float | None:
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """One daemon with everything going on, scraped once every kind of series is there."""
    tmp = tmp_path_factory.mktemp("scrape")
    dev = tmp / "dev"
    dev.mkdir()
    kmsg = dev / "kmsg"
    kmsg.write_text("6,1,1,-;Linux version (history before the daemon started)\n")
    config = tmp / "config.toml"
    config.write_text(
        f"[paths]\ndevfs = '{dev}'\n\n"
        "[collectors.gpu]\ninterval_seconds = 0.5\n\n"
        "[collectors.kmsg]\ninterval_seconds = 0.5\n\n"
        "[collectors.xid]\ninterval_seconds = 0.5\n\n"
        "[collectors.training]\ninterval_seconds = 0.5\n"
    )
    port = free_port()
    runtime = tmp / "run"
    log = tmp / "daemon.log"
    cmd = daemon_argv(
        tmp,
        config=config,
        listen=f"127.0.0.1:{port}",
        procfs=FIXTURES / "hosts" / "vm_psi" / "proc",
        sysfs=FIXTURES / "infiniband" / "ndr_4port" / "sys",
    )
    env = daemon_env(TRAINWARDEN_NVML_FIXTURE="h100-sxm-8gpu")
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    reporter = None
    try:

        def served(name: str) -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return name in _get(url + "/metrics")
            except OSError:
                return False

        def served_counted(name: str) -> bool:
            return re.search(rf"^{name}{{[^}}]*}} [1-9]", _get(url + "/metrics"), re.MULTILINE) is not None

        wait_until(lambda: served('collector="xid"'), 60.0, "the daemon's first collection")
        reporter = Reporter(
            job="scrape",
            socket_path=runtime / "client.sock",
            control_dir=runtime / "control",
            env={"RANK": "0", "WORLD_SIZE": "1"},
            stack_dump=False,
        )
        for step in range(20):
            reporter.step(step, loss=2.0 - step / 100, grad_norm=1.0, lr=1e-3, samples=32)
        reporter.step(20, loss=math.nan, grad_norm=math.inf, lr=1e-3, samples=32)
        reporter.flush(5.0)
        with kmsg.open("a") as handle:
            handle.write(
                "4,2,2,-;NVRM: Xid (PCI:0000:db:00): 79, pid=41008, name=python, fell off the bus.\n"
            )
        wait_until(lambda: served('trainwarden_findings_active{rule="nonfinite"'), 60.0, "the NaN finding")
        wait_until(lambda: served_counted("trainwarden_actions_total"), 60.0, "a policy decision")
        wait_until(lambda: served('trainwarden_gpu_xid_errors_total{gpu="7"'), 60.0, "XID 79 counted")
        text = _get(url + "/metrics")
        status = json.loads(_get(url + "/status"))
        yield Scrape(text, status, log)
    finally:
        if reporter is not None:
            reporter.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) missing")
def test_promtool_passes_the_full_scrape(scrape: Scrape) -> None:
    """`promtool check metrics` (Prometheus' linter) has nothing to say about any series of a busy node."""
    assert scrape.value("trainwarden_train_step", job="scrape", rank="0") == 20
    assert scrape.value("trainwarden_gpu_xid_errors_total", gpu="7", xid="79") == 1
    assert scrape.value("trainwarden_findings_active", rule="nonfinite", severity="critical") == 1
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape.text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_fake_gpus_are_flagged_in_metrics_status_and_log(scrape: Scrape) -> None:
    """On the NVML fixture the node says it is fake: a metric, /status and a warning at start."""
    assert scrape.value("trainwarden_nvml_fake") == 1
    gpu = scrape.status["collectors"]["gpu"]  # type: ignore[index]
    assert str(gpu["detail"]["fake_nvml"]).endswith("h100-sxm-8gpu.json")
    warnings = [line for line in scrape.log.read_text().splitlines() if "FAKE GPUs" in line]
    assert len(warnings) == 1, warnings


def documented_families(text: str) -> set[str]:
    """Every `trainwarden_…` name in the doc's tables (first column), without sample suffixes."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("|"):
            first = line.split("|")[1]
            names.update(re.findall(r"`(trainwarden_[a-z0-9_]+)", first))
    return names


def test_every_family_of_the_full_scrape_is_documented(scrape: Scrape) -> None:
    """docs/METRICS.md names each family a node exports, so a Prometheus user can look any series up."""
    exported = {family.name for family in text_string_to_metric_families(scrape.text)}
    documented = documented_families(METRICS_DOC.read_text())
    # The parser names counters without `_total` and info metrics without `_info`; accept both.
    missing = sorted(name for name in exported if not {name, f"{name}_total", f"{name}_info"} & documented)
    assert missing == []
