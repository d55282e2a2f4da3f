"""The preflight and the node daemon: the daemon exports the last result, the preflight asks the daemon."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from preflight_support import FixtureNode, healthy_node
from support import wait_until
from trainwarden.collectors.base import CollectorContext
from trainwarden.config import CollectorOptions, config_from_dict
from trainwarden.daemon import cli
from trainwarden.daemon.app import Daemon
from trainwarden.daemon.exporter import make_registry
from trainwarden.plugins import plugin_groups
from trainwarden.preflight.collector import PreflightResultCollector
from trainwarden.preflight.model import Status
from trainwarden.preflight.record import result_path
from trainwarden.preflight.runner import FAMILIES, run_preflight
from trainwarden.store import Store

DAEMON_FAMILY = tuple(f for f in FAMILIES if f.names == ("daemon",))


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FixtureNode:
    """A healthy fixture node."""
    return healthy_node(tmp_path, monkeypatch)


@contextmanager
def daemon_on(node: FixtureNode) -> Iterator[str]:
    """A real daemon on loopback using the node's state dir; yields its base URL once ready."""
    data: dict[str, Any] = {
        "daemon": {
            "listen": "127.0.0.1:0",
            "runtime_dir": str(node.root / "run"),
            "state_dir": str(node.state_dir),
        },
        "paths": {"procfs": str(node.procfs), "sysfs": str(node.sysfs), "devfs": str(node.devfs)},
        "collectors": {"preflight": {"interval_seconds": 0.2}},
    }
    daemon = Daemon(config_from_dict(data, plugin_groups()))
    daemon.start()
    try:
        host, port = daemon.address
        wait_until(daemon.ready.is_set, 30.0, "daemon ready")
        yield f"http://{host}:{port}"
    finally:
        daemon.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def collected(node: FixtureNode) -> Any:
    """One collection of the result collector on the node's state dir, as a registry."""
    collector = PreflightResultCollector(CollectorOptions(), CollectorContext(state_dir=node.state_dir))
    store = Store()
    store.replace("preflight", collector.collect(), 0.0)
    return make_registry(store)


def test_result_is_exported_per_check(node: FixtureNode) -> None:
    """After a failing preflight, the failed check reads 0, a passed one 1, skipped ones are counted."""
    node.use_nvml("h100-lost-gpu")
    assert cli.main(["preflight", f"--state-dir={node.state_dir}", "--daemon-url=http://127.0.0.1:9"]) == 1
    reg = collected(node)
    assert reg.get_sample_value("trainwarden_preflight_last_result", {"check": "gpu_nvml"}) == 0.0
    assert reg.get_sample_value("trainwarden_preflight_last_result", {"check": "gpu_clocks"}) == 1.0
    assert reg.get_sample_value("trainwarden_preflight_last_result", {"check": "daemon"}) is None
    assert reg.get_sample_value("trainwarden_preflight_last_checks", {"result": "skipped"}) >= 1.0
    assert reg.get_sample_value("trainwarden_preflight_last_healthy") == 0.0
    assert reg.get_sample_value("trainwarden_preflight_last_run_timestamp_seconds") > 0
    assert reg.get_sample_value("trainwarden_preflight_result_errors_total") == 0.0


def test_damaged_result_file_is_counted_not_exported(node: FixtureNode) -> None:
    """A damaged result file exports no verdict, counts one error, and a repaired one exports again."""
    node.state_dir.mkdir()
    result_path(node.state_dir).write_text('{"format_version": 1, "checks": "everything passed"}')
    collector = PreflightResultCollector(CollectorOptions(), CollectorContext(state_dir=node.state_dir))
    for _ in range(3):
        samples = {s.spec.name: s.value for s in collector.collect()}
    assert samples == {"trainwarden_preflight_result_errors_total": 1.0}
    assert "'checks' must be a list" in str(collector.status()["error"])
    assert cli.main(["preflight", f"--state-dir={node.state_dir}", "--daemon-url=http://127.0.0.1:9"]) == 0
    samples = {s.spec.name: s.value for s in collector.collect()}
    assert samples["trainwarden_preflight_last_healthy"] == 1.0


def test_unknown_check_names_in_the_file_are_not_exported(node: FixtureNode) -> None:
    """A result file naming checks trainwarden does not ship adds no series (labels stay bounded)."""
    node.state_dir.mkdir()
    checks = ",".join(f'{{"check": "made_up_{i}", "status": "fail"}}' for i in range(500))
    result_path(node.state_dir).write_text(
        f'{{"format_version": 1, "checks": [{checks}], "healthy": false, '
        '"finished_at": 1.0, "duration_seconds": 0.1}'
    )
    reg = collected(node)
    names = {s.labels.get("check") for m in reg.collect() for s in m.samples if "check" in s.labels}
    assert names == set()
    assert reg.get_sample_value("trainwarden_preflight_last_checks", {"result": "fail"}) == 500.0


def test_preflight_reports_a_ready_daemon_and_the_daemon_exports_its_result(node: FixtureNode) -> None:
    """With the daemon running, the daemon check passes, and the daemon's /metrics shows the run."""
    with daemon_on(node) as url:
        assert cli.main(["preflight", f"--state-dir={node.state_dir}", f"--daemon-url={url}"]) == 0
        key = ("trainwarden_preflight_last_result", (("check", "daemon"),))
        wait_until(lambda: scrape(url).get(key) == 1.0, 30.0, "daemon exporting the preflight result")
        assert scrape(url)[("trainwarden_preflight_last_healthy", ())] == 1.0


def test_daemon_with_a_firing_gpu_finding_fails_the_daemon_check(node: FixtureNode) -> None:
    """A daemon whose gpu_health rule fires on a lost GPU makes the daemon check fail with its summary."""
    node.use_nvml("h100-lost-gpu")
    with daemon_on(node) as url:
        options = node.options(daemon_url=url)

        def daemon_fails() -> bool:
            return run_preflight(options, DAEMON_FAMILY).checks[0].status is Status.FAIL

        wait_until(daemon_fails, 30.0, "the daemon's gpu_health finding to fire")
        result = run_preflight(options, DAEMON_FAMILY).checks[0]
    assert "GPU 3 is lost" in result.reason
