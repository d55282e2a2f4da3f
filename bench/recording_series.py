"""Series the shipped recording rules add per node, measured on a real Prometheus.

One real `trainwarden daemon` runs on the fixtures (FakeNvml with 8 GPUs, the 4-port InfiniBand
fixture, one training rank of job "llm", two XIDs; see tests/exported_metrics.py). A real
Prometheus (Debian's `prometheus`) scrapes it as N nodes (the same target under N `node` labels,
so one job spans N nodes), evaluates prometheus/recording.rules.yml every second, and is asked
how many series each recording rule produced. Done for several N; the per-node cost is the slope
(series at the largest N minus series at the smallest, divided by the node difference), so
cluster-wide series (per job, per XID action) are not counted as per-node ones.

    .venv/bin/python bench/recording_series.py                # N = 1, 4, 16
    .venv/bin/python bench/recording_series.py --nodes 1 8 --markdown
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from exported_metrics import fixture_daemon  # noqa: E402 - tests/ on the path first
from support import free_port  # noqa: E402

RULES = ROOT / "prometheus" / "recording.rules.yml"
NODE_BUDGET = 2500  # docs/METRICS.md, per node


def query(url: str, expr: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=10
    ) as response:
        result: list[dict[str, Any]] = json.load(response)["data"]["result"]
    return result


def recorded_rules() -> list[str]:
    return [line.split(":", 1)[1].strip() for line in RULES.read_text().splitlines() if "- record:" in line]


def measure(target: str, nodes: int, work: Path) -> dict[str, Any]:
    """Run Prometheus over `nodes` copies of the target; count raw and recorded series per rule."""
    config = work / f"prometheus-{nodes}.yml"
    statics = [{"targets": [target], "labels": {"node": f"node-{i:04d}"}} for i in range(nodes)]
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": "trainwarden", "honor_labels": True, "static_configs": statics}
                ],
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        shutil.which("prometheus") or "prometheus", f"--config.file={config}",
        f"--storage.tsdb.path={work / f'data-{nodes}'}", f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = recorded_rules()
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                up = query(url, 'count(up{job="trainwarden"} == 1)')
                ratio = query(url, "count(job_node:trainwarden_train_step_seconds:ratio_to_job_p50)")
                if up and int(up[0]["value"][1]) == nodes and ratio and int(ratio[0]["value"][1]) == nodes:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"Prometheus did not scrape and record {nodes} nodes in time")
            time.sleep(0.5)
        time.sleep(3)  # a few more evaluations, so every rule has run on complete data
        per_rule = {}
        for name in names:
            result = query(url, f"count({{__name__={json.dumps(name)}}})")
            per_rule[name] = int(result[0]["value"][1]) if result else 0
        raw = query(url, 'count({job!="", __name__!~".+:.+"})')
        return {"nodes": nodes, "raw": int(raw[0]["value"][1]), "recorded": per_rule}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16], help="node counts to measure")
    parser.add_argument("--markdown", action="store_true", help="print a table for docs/BENCHMARKS.md")
    args = parser.parse_args()
    if shutil.which("prometheus") is None:
        raise SystemExit("prometheus is not installed (Debian: prometheus)")
    work = Path(tempfile.mkdtemp(prefix="tw-bench-rules-"))
    (work / "daemon").mkdir()
    with fixture_daemon(work / "daemon") as url:
        target = url.removeprefix("http://")
        runs = [measure(target, n, work) for n in sorted(set(args.nodes))]
    low, high = runs[0], runs[-1]
    span = max(1, high["nodes"] - low["nodes"])
    per_node = {
        name: (high["recorded"][name] - low["recorded"][name]) / span
        if len(runs) > 1
        else high["recorded"][name]
        for name in high["recorded"]
    }
    recorded_per_node = sum(per_node.values())
    raw_per_node = (high["raw"] - low["raw"]) / span if len(runs) > 1 else high["raw"]
    if args.markdown:
        header = " | ".join(f"N={r['nodes']}" for r in runs)
        print(f"| recording rule | {header} | per node |")
        print("|---|" + "---|" * len(runs) + "---|")
        for name in high["recorded"]:
            counts = " | ".join(str(r["recorded"][name]) for r in runs)
            print(f"| `{name}` | {counts} | {per_node[name]:g} |")
        totals = " | ".join(str(sum(r["recorded"].values())) for r in runs)
        print(f"| **all recording rules** | {totals} | **{recorded_per_node:g}** |")
        raws = " | ".join(str(r["raw"]) for r in runs)
        print(f"| scraped series (for scale) | {raws} | {raw_per_node:g} |")
    else:
        print(
            json.dumps(
                {
                    "runs": runs,
                    "recorded_per_node": per_node,
                    "raw_per_node": raw_per_node,
                    "budget": NODE_BUDGET,
                },
                indent=1,
            )
        )
    if raw_per_node + recorded_per_node > NODE_BUDGET:
        raise SystemExit(
            f"{raw_per_node + recorded_per_node:g} series per node, over the {NODE_BUDGET} budget"
        )


if __name__ == "__main__":
    main()
