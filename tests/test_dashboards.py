"""The shipped Grafana dashboards: generated from code, importable as they are, reading real series."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exported_metrics import exported_series_names, fixture_daemon, metric_names_in
from support import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # dashboards/ lives at the repo root, beside tests/
from dashboards import generate, specs  # noqa: E402
from dashboards.queries import all_panel_queries, render, variable_selectors  # noqa: E402

DASHBOARD_DIR = ROOT / "dashboards"
RECORDING_RULES = ROOT / "prometheus" / "recording.rules.yml"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
# What the fixture daemon of exported_metrics provides (not two checkpoints: it saves once).
FIXTURE_PROVIDES = frozenset(
    {"gpu", "infiniband", "checkpoints_volume", "training", "recording_rules", "refusal"}
)


def committed() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object inside `node`, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_regenerating_changes_nothing() -> None:
    """The committed JSON is exactly what dashboards/generate.py writes, and there is no other JSON."""
    assert {generate.path_of(spec).name for spec in specs.DASHBOARDS} == set(committed())
    for spec in specs.DASHBOARDS:
        assert generate.path_of(spec).read_text() == generate.render(spec), (
            f"{generate.path_of(spec).name} is stale: run .venv/bin/python dashboards/generate.py"
        )


def test_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`generate.py --check` exits 1 when a committed file differs, and 0 when all match."""
    for spec in specs.DASHBOARDS:
        (tmp_path / generate.path_of(spec).name).write_text(generate.render(spec))
    monkeypatch.setattr(generate, "HERE", tmp_path)
    assert generate.main(["--check"]) == 0
    (tmp_path / "node.json").write_text("{}\n")
    assert generate.main(["--check"]) == 1


def test_datasource_is_a_variable_everywhere() -> None:
    """Every panel, query and variable names its data source as ${datasource}; no uid is hard-coded."""
    for name, dashboard in committed().items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus", name
        refs = [obj["datasource"] for obj in walk(dashboard) if "datasource" in obj]
        assert refs, name
        assert all(ref == {"type": "prometheus", "uid": "${datasource}"} for ref in refs), name
        for panel in panels(dashboard):
            assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_dashboards_are_importable_as_they_are() -> None:
    """Current schemaVersion, a stable uid, unique panel ids, a 24-column grid, job/node/gpu variables."""
    names: set[str] = set()
    for name, dashboard in committed().items():
        assert dashboard["schemaVersion"] == generate.SCHEMA_VERSION == 41, name
        assert dashboard["uid"].startswith("trainwarden-"), name
        assert "id" not in dashboard or dashboard["id"] is None, name
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard["panels"]), name
        assert all(panel["targets"] for panel in panels(dashboard)), name
        names |= {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "node", "gpu"} <= names


def test_node_dashboard_shows_the_checkpoint_volume_first() -> None:
    """In the node dashboard's Disks row, the first panel is the checkpoint volume."""
    disks = next(row for row in specs.NODE.rows if row.title == "Disks")
    assert 'volume="checkpoints"' in disks.panels[0].queries[0].expr


def test_runbook_names_only_panels_that_exist() -> None:
    """Every panel the runbook tells the on-call to look at (*in italics*) is a shipped panel."""
    titles = {p.title for d in specs.DASHBOARDS for r in d.rows for p in r.panels}
    italics = set(re.findall(r"(?<![*\w])\*([^*\n]+)\*(?![*\w])", RUNBOOK.read_text()))
    named = {i for i in italics if not i.startswith("Trainwarden") and "→" not in i}
    assert named, "the runbook names no panel"
    assert named <= titles, f"runbook names missing panels: {sorted(named - titles)}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_every_panel_query_parses(tmp_path: Path) -> None:
    """promtool parses every panel query and variable selector (as recording rules in a scratch file)."""
    exprs = [render(q.expr) for q in all_panel_queries()] + [render(s) for _, _, s in variable_selectors()]
    rules = {
        "groups": [
            {"name": "panels", "rules": [{"record": f"panel_{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    scratch = tmp_path / "panels.rules.yml"
    scratch.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [PROMTOOL or "promtool", "check", "rules", str(scratch)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_queries_helper_renders_variables() -> None:
    """all_panel_queries() covers every panel target, and rendering replaces every Grafana variable."""
    queries = all_panel_queries()
    assert len(queries) == sum(len(p.queries) for d in specs.DASHBOARDS for r in d.rows for p in r.panels)
    loss = next(q for q in queries if q.panel == "Loss")
    assert loss.rendered({"job": "toy"}) == 'trainwarden_train_loss{job=~"toy", node=~".*"}'
    assert all("$" not in q.rendered() for q in queries)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_panels_only_read_series_the_daemon_exports(tmp_path: Path) -> None:
    """Every series a panel or variable selects is exported by a fixture daemon or recorded by a rule."""
    exported = exported_series_names(tmp_path)
    recorded = {
        r["record"] for g in yaml.safe_load(RECORDING_RULES.read_text())["groups"] for r in g["rules"]
    }
    for query in all_panel_queries():
        unknown = metric_names_in(query.expr) - exported - recorded
        assert not unknown, f"{query.dashboard} / {query.panel} reads series nobody exports: {unknown}"
    for uid, name, selector in variable_selectors():
        assert not metric_names_in(selector) - exported, f"{uid}: variable {name}"


def range_query(url: str, expr: str, start: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": time.time(), "step": "1s"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: prometheus)")
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_panels_return_data_on_a_real_prometheus(tmp_path: Path) -> None:
    """A real Prometheus scraping a fixture daemon with the shipped rules answers every panel with data."""
    (tmp_path / "daemon").mkdir()
    with fixture_daemon(tmp_path / "daemon") as daemon_url:
        config = tmp_path / "prometheus.yml"
        scrape = {
            "job_name": "trainwarden",
            "honor_labels": True,
            "static_configs": [
                {"targets": [daemon_url.removeprefix("http://")], "labels": {"node": "node-a"}}
            ],
        }
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RECORDING_RULES)],
                    "scrape_configs": [scrape],
                }
            )
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            PROMETHEUS or "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]  # fmt: skip
        log = tmp_path / "prometheus.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            start = time.time()

            def recorded() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    return bool(
                        range_query(url, "job_node:trainwarden_train_step_seconds:ratio_to_job_p50", start)
                    )
                except OSError:
                    return False

            wait_until(recorded, 90.0, "Prometheus to scrape the daemon and record the rules")
            empty = [
                f"{q.dashboard} / {q.panel} ({q.ref_id})"
                for q in all_panel_queries()
                if q.requires <= FIXTURE_PROVIDES
                and not range_query(url, q.rendered(rate_interval="5s"), start)
            ]
            assert not empty, f"panels without data: {empty}"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
