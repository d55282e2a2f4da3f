"""Cost of one detect-and-decide tick: every default rule over a busy node's store, then the policy.

A node with RANKS ranks that each reported STEPS step records (the windows a 600 s window holds at
~1 step/s), plus the phase, collective and per-rank gauges of the training contract; the engine
runs every registered rule (defaults) and the policy decides on the findings against a real
journal on disk. Measured: wall time per `engine.tick` and per `policy.tick` (p50, p99, max) over
many ticks, and the series count, so the cost can be set against the tick interval (1 s).

Usage: .venv/bin/python bench/rules_tick.py [--ranks 8] [--steps 600] [--ticks 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from training_series import TrainingFeed
from trainwarden.config import config_from_dict
from trainwarden.healers.policy import Policy
from trainwarden.plugins import plugin_groups
from trainwarden.rules.engine import RuleEngine
from trainwarden.store import Store


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--ticks", type=int, default=200)
    args = parser.parse_args()

    store = Store(window_seconds=600.0, max_points=2048)
    feed = TrainingFeed(store)
    start = 1_000_000.0
    for i in range(args.steps):
        t = start + i
        for rank in range(args.ranks):
            jitter = 0.03 * (((i * 7 + rank * 3) % 5) - 2)
            feed.step(rank, t, 1.0 + jitter, loss=2.0 - i * 1e-4 + jitter, grad_norm=1.0 + jitter)
    for rank in range(args.ranks):
        feed.phase(rank, "step", start)
    now = start + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = {"daemon": {"state_dir": tmp, "runtime_dir": tmp}}
        config = config_from_dict(data, plugin_groups())
        engine = RuleEngine.from_config(config, store)
        policy = Policy.from_config(config, store)
        engine_s: list[float] = []
        policy_s: list[float] = []
        findings = 0
        for k in range(args.ticks):
            tick_now = now + k * 0.001
            t0 = time.perf_counter()
            found = engine.tick(tick_now)
            t1 = time.perf_counter()
            policy.tick(tick_now, found)
            t2 = time.perf_counter()
            engine_s.append(t1 - t0)
            policy_s.append(t2 - t1)
            findings = len(found)
    series = len(store.latest())
    points = sum(len(p) for name in ("trainwarden_train_step_seconds",) for _, p in store.windows(name))
    print(f"ranks={args.ranks} steps/rank={args.steps} series={series} step_seconds points={points}")
    print(f"rules={len(engine.rule_names)} findings on the last tick={findings} ticks={args.ticks}")
    for label, values in (("engine.tick", engine_s), ("policy.tick", policy_s)):
        print(
            f"{label:12s} p50 {statistics.median(values) * 1e3:7.2f} ms"
            f"  p99 {_pct(values, 0.99) * 1e3:7.2f} ms  max {max(values) * 1e3:7.2f} ms"
        )


if __name__ == "__main__":
    main()
