"""The shipped Prometheus rules: promtool accepts them, their unit tests pass, and each alert is complete."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from exported_metrics import exported_series_names, metric_names_in
from support import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "prometheus"
RULE_FILES = (RULES / "recording.rules.yml", RULES / "alerts.rules.yml")
TEST_FILES = sorted((RULES / "tests").glob("*.test.yml"))
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
SEVERITIES = {"critical", "warning", "info"}
# Labels a finding understands (subject) plus the one bounded detail an alert may carry.
ALERT_LABELS = {"alertname", "severity", "job", "node", "gpu", "rank", "collector", "reason", "healer"}
EXAMPLE_CONFIG = RULES / "prometheus.example.yml"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian: prometheus)"
)
# What a daemon serves: one training series (with its own `job`) and one daemon series.
EXPOSITION = b'trainwarden_train_step{job="llm",rank="0"} 5\ntrainwarden_daemon_ready 1\n'


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def rules(kind: str) -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in load(path)["groups"]
        for rule in group["rules"]
        if kind in rule
    ]


def alert_cases() -> list[dict[str, Any]]:
    return [
        case
        for path in TEST_FILES
        for test in load(path)["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def runbook_anchors() -> set[str]:
    """GitHub-style anchors of the runbook's headings."""
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@needs_promtool
def test_promtool_accepts_the_rule_files() -> None:
    """`promtool check rules` finds every rule file valid (syntax, PromQL, templates, no duplicates)."""
    result = subprocess.run(
        [PROMTOOL or "promtool", "check", "rules", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    """Every promtool unit test passes: alerts fire with exactly the expected labels, near misses do not."""
    result = subprocess.run(
        [PROMTOOL or "promtool", "test", "rules", test_file.name],
        cwd=test_file.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    """Each alert is tested both firing and not firing (at an earlier time, or with near-miss series)."""
    cases = alert_cases()
    for alert in rules("alert"):
        name = alert["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it must not fire"


def test_every_alert_is_actionable() -> None:
    """Each alert has a `for:`, a severity, a summary, a description and an existing runbook section."""
    anchors = runbook_anchors()
    for alert in rules("alert"):
        name = alert["alert"]
        assert alert.get("for"), f"{name}: no for:"
        assert alert["labels"]["severity"] in SEVERITIES, name
        notes = alert["annotations"]
        assert notes.get("summary"), name
        assert notes.get("description"), name
        prefix, _, anchor = notes["runbook_url"].partition("#")
        assert prefix == "docs/RUNBOOK.md", name
        assert anchor == name.lower(), f"{name}: runbook_url should point at its own section"
        assert anchor in anchors, f"{name}: docs/RUNBOOK.md has no section #{anchor}"


def test_fired_alerts_carry_only_bounded_finding_labels() -> None:
    """Every expected alert in the unit tests carries only job/node/gpu/rank and one bounded detail label."""
    for case in alert_cases():
        for expected in case.get("exp_alerts") or []:
            extra = set(expected["exp_labels"]) - ALERT_LABELS
            assert not extra, f"{case['alertname']}: unbounded labels {extra}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rules_only_read_series_the_daemon_exports(tmp_path: Path) -> None:
    """Every series a rule selects is exported by a real daemon on the fixtures or recorded by a rule."""
    exported = exported_series_names(tmp_path)
    recorded = {rule["record"] for rule in rules("record")}
    for rule in rules("expr"):
        unknown = metric_names_in(rule["expr"]) - exported - recorded
        assert not unknown, (
            f"{rule.get('alert') or rule.get('record')} reads series nobody exports: {unknown}"
        )


def example_config(tmp_path: Path, targets: list[str], discovered: list[dict[str, Any]]) -> Path:
    """The shipped example with the repo's rule files, 1 s intervals and the test's targets."""
    config = load(EXAMPLE_CONFIG)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(path) for path in RULE_FILES]
    del config["alerting"]
    scrape = config["scrape_configs"][0]
    scrape["static_configs"] = [{"targets": targets}]
    sd_file = tmp_path / "targets.json"
    sd_file.write_text(json.dumps(discovered))
    scrape["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Exposition(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(EXPOSITION)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def exposition_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def query(url: str, expr: str) -> list[dict[str, str]]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=5
    ) as response:
        body = json.load(response)
    return [r["metric"] for r in body["data"]["result"]]


@needs_promtool
def test_example_scrape_config_is_valid(tmp_path: Path) -> None:
    """`promtool check config` accepts the shipped example once its rule files exist."""
    config = example_config(tmp_path, ["localhost:9871"], [])
    result = subprocess.run(
        [PROMTOOL or "promtool", "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_example_scrape_config_sets_node_and_keeps_the_training_job(
    tmp_path: Path, exposition_port: int
) -> None:
    """A real Prometheus on the example config names each target's node and keeps the training job label."""
    config = example_config(
        tmp_path,
        [f"localhost:{exposition_port}"],
        [{"targets": [f"127.0.0.1:{exposition_port}"], "labels": {"node": "gpu-b02"}}],
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    cmd = [
        PROMETHEUS or "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:

        def both_scraped() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return len(query(url, 'up{job="trainwarden"} == 1')) == 2
            except OSError:
                return False

        wait_until(both_scraped, 60.0, "Prometheus to scrape both targets")
        steps = query(url, "trainwarden_train_step")
        assert sorted(m["node"] for m in steps) == ["gpu-b02", "localhost"]
        assert {m["job"] for m in steps} == {"llm"}
        assert not any("exported_job" in m for m in steps)
        ready = query(url, "trainwarden_daemon_ready")
        assert {(m["job"], m["node"]) for m in ready} == {
            ("trainwarden", "gpu-b02"),
            ("trainwarden", "localhost"),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
