"""Latency of the Slurm drain healer and the requeue backend against a real single-node Slurm.

Starts the same throw-away cluster as the tests (tests/slurm_cluster.py: munged, slurmctld and
slurmd under a temp dir, as root) and measures, on this machine:

- cluster start: from spawning munged to the node being IDLE;
- `SlurmDrainHealer.apply` for drain and for undrain (each = state read, budget read for drain,
  `scontrol update`, state re-read): p50 / p90 / max over N rounds;
- requeue to the job's next run (the moment its second run writes its first line), with
  `start_now=True` (the begin-time hold cleared) over a few rounds, and with `--with-hold` once
  without it, which shows Slurm's own hold of a requeued job (about two minutes on 22.05).

Usage: .venv/bin/python bench/slurm_drain.py [--rounds 20] [--requeues 3] [--with-hold] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from slurm_cluster import SlurmCluster, skip_reason, slurm_cluster_running
from trainwarden.backends.slurm import Scontrol, requeue_job
from trainwarden.commands import CommandRunner
from trainwarden.healers.base import Action, ActionOutcome, HealerContext
from trainwarden.healers.slurm_drain import SlurmDrainHealer, SlurmDrainOptions


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_s": statistics.median(ordered),
        "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max_s": ordered[-1],
    }


def bench_drain(cluster: SlurmCluster, rounds: int) -> dict[str, dict[str, float]]:
    options = SlurmDrainOptions(enabled=True, slurm_conf=str(cluster.conf), node=cluster.node)
    healer = SlurmDrainHealer(options, HealerContext())
    drain = Action("slurm_drain", "bench", "bench drain", params={"operation": "drain"})
    undrain = Action("slurm_drain", "bench", "bench", params={"operation": "undrain"})
    times: dict[str, list[float]] = {"drain": [], "undrain": []}
    for _ in range(rounds):
        for name, action in (("drain", drain), ("undrain", undrain)):
            start = time.perf_counter()
            result = healer.apply(action, dry_run=False)
            times[name].append(time.perf_counter() - start)
            if result.outcome is not ActionOutcome.APPLIED:
                raise SystemExit(f"{name} did not apply: {result.detail}")
    return {name: summary(values) for name, values in times.items()}


def time_to_rerun(cluster: SlurmCluster, *, start_now: bool, timeout: float) -> float:
    job_id = cluster.submit("echo run restart=${SLURM_RESTART_COUNT:-0}; sleep 600")
    cluster.wait_for("first run", lambda: "restart=0" in cluster.job_output(job_id))
    scontrol = Scontrol(CommandRunner(env={"SLURM_CONF": str(cluster.conf)}))
    start = time.perf_counter()
    result = requeue_job(scontrol, job_id, dry_run=False, restarts_seen=0, start_now=start_now)
    if result.outcome is not ActionOutcome.APPLIED:
        raise SystemExit(f"requeue failed: {result.detail}")
    cluster.wait_for("second run", lambda: "restart=1" in cluster.job_output(job_id), timeout)
    elapsed = time.perf_counter() - start
    cluster.run("scancel", job_id, check=False)
    cluster.reset()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requeues", type=int, default=3)
    parser.add_argument("--with-hold", action="store_true", help="also time one requeue without start_now")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    results: dict[str, object] = {}
    start = time.perf_counter()
    with slurm_cluster_running() as cluster:
        results["cluster_start_s"] = time.perf_counter() - start
        results["apply"] = bench_drain(cluster, args.rounds)
        rerun = [time_to_rerun(cluster, start_now=True, timeout=60) for _ in range(args.requeues)]
        results["requeue_to_rerun_start_now"] = summary(rerun)
        if args.with_hold:
            results["requeue_to_rerun_with_hold_s"] = time_to_rerun(cluster, start_now=False, timeout=300)
    print(f"cluster start: {results['cluster_start_s']:.2f} s")
    for name, row in results["apply"].items():  # type: ignore[attr-defined]
        print(f"{name:8s} apply: p50 {row['p50_s'] * 1000:.0f} ms  p90 {row['p90_s'] * 1000:.0f} ms  "
              f"max {row['max_s'] * 1000:.0f} ms  (n={row['n']})")  # fmt: skip
    row = results["requeue_to_rerun_start_now"]
    print(
        f"requeue -> next run (start_now): p50 {row['p50_s']:.2f} s  max {row['max_s']:.2f} s  (n={row['n']})"
    )  # type: ignore[index]
    if "requeue_to_rerun_with_hold_s" in results:
        print(f"requeue -> next run (Slurm's hold): {results['requeue_to_rerun_with_hold_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
