"""What the node-local checkpoint tier buys and costs: blocking time per save, steps repeated on a crash.

Three configurations in one run, on the same model, step time and crash times:
  - durable only: today's path, `CheckpointManager(durable, async_save=True, durable_every=D)`;
  - tiered: the same plus `local_dir=/dev/shm/trainwarden/<bench job>, local_every=L`, with L = 5
    (the write fits in the interval) and L = 1 (it does not: each save waits for the previous one).
A worker process trains (steps padded to `--step-time`, one `save()` per step boundary) and is
SIGKILLed after a seeded random number of steps, at a seeded random point inside a step; a
second process resumes and says from which step and tier. Steps repeated = the steps the killed
run had finished beyond the step resumed from. Blocking time per save = the wall time of the
`save()` calls that wrote something (the background write is not counted: that is the point),
as a median and p95, and as a share of the step time; the first save of each process (DCP's
warm-up, paid once per process whatever the tier) is left out and shown apart.

Usage: .venv/bin/python bench/checkpoint_tiers.py [--crashes 4] [--width 1024] [--layers 4]
       [--step-time 0.1] [--durable-every 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = (("durable only", 0), ("tiered", 5), ("tiered", 1))
"""(name, local_every): the local interval the write fits in, and one it does not."""


def worker(args: argparse.Namespace) -> int:
    """Train until killed (or `--steps`), or only resume (`--resume-only`); print what happened."""
    import torch  # noqa: PLC0415

    from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    local = {} if args.local_dir is None else {"local_dir": args.local_dir, "local_every": args.local_every}
    manager = CheckpointManager(
        args.root, keep_last=2, async_save=True, durable_every=args.durable_every, **local
    )
    state = {"train": ModelOptimizerState(model, opt)}
    started = time.perf_counter()
    resume = manager.load_latest(state)
    load_s = time.perf_counter() - started
    start = 0 if resume is None else resume.step + 1
    if resume is not None:
        print(f"RESUMED {resume.step} {resume.tier} {load_s:.4f}", flush=True)
    if args.resume_only:
        return 0
    x = torch.randn(32, args.width)
    for step in range(start, args.steps):
        began = time.perf_counter()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        save_began = time.perf_counter()
        path = manager.save(step, state)
        blocked = time.perf_counter() - save_began
        if path is not None:
            tier = (
                "local" if args.local_dir is not None and str(path).startswith(args.local_dir) else "durable"
            )
            print(f"SAVE {step} {tier} {blocked:.6f}", flush=True)
        print(f"STEP {step}", flush=True)
        time.sleep(max(0.0, args.step_time - (time.perf_counter() - began)))
    manager.close()
    return 0


def _command(args: argparse.Namespace, root: Path, local_dir: Path | None, *extra: str) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--root", str(root), "--width", str(args.width)]
    cmd += ["--layers", str(args.layers), "--step-time", str(args.step_time)]
    cmd += ["--durable-every", str(args.durable_every), "--local-every", str(args.local_every)]
    if local_dir is not None:
        cmd += ["--local-dir", str(local_dir)]
    return [*cmd, *extra]


def trial(
    args: argparse.Namespace, local_dir: Path | None, kill_after: int, delay: float
) -> dict[str, object]:
    """One crash: train, SIGKILL after `kill_after` steps (+ `delay` s), resume; what it cost."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "durable"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.Popen(
            _command(args, root, local_dir, "--steps", "100000"), stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        saves: list[tuple[str, float]] = []
        last = -1
        for line in proc.stdout:
            if match := re.match(r"SAVE (\d+) (\w+) ([\d.]+)", line):
                saves.append((match.group(2), float(match.group(3))))
            elif match := re.match(r"STEP (\d+)", line):
                last = int(match.group(1))
                if last + 1 >= kill_after:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait()
        resumed = subprocess.run(
            _command(args, root, local_dir, "--resume-only"),
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        found = re.search(r"RESUMED (\d+) (\w+) ([\d.]+)", resumed)
        resume_step = -1 if found is None else int(found.group(1))
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)
        return {
            "finished": last,
            "resumed": resume_step,
            "tier": "none" if found is None else found.group(2),
            "repeated": last - resume_step,
            "saves": saves,
        }


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=100000, help=argparse.SUPPRESS)
    p.add_argument("--crashes", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--step-time", type=float, default=0.1)
    p.add_argument("--durable-every", type=int, default=10)
    p.add_argument("--local-every", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rng = random.Random(args.seed)
    plan = [(rng.randrange(25, 60), rng.uniform(0.0, args.step_time)) for _ in range(args.crashes)]
    params = args.layers * (args.width * args.width + args.width)
    print(f"model: {params / 1e6:.1f} M parameters ({params * 12 / 2**20:.0f} MiB with AdamW state), "
          f"step {args.step_time} s, durable every {args.durable_every}, "
          f"{args.crashes} crashes (seed {args.seed})")  # fmt: skip
    print("| configuration | tier | saves | blocking median (ms) | p95 (ms) | median / step time "
          "| steps repeated per crash | resumed from |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, local_every in CONFIGS:
        args.local_every = max(1, local_every)
        config = f"{name}, local every {local_every}" if local_every else name
        local_dir = Path(f"/dev/shm/trainwarden/bench-tiers-{os.getpid()}") if local_every else None
        results = [trial(args, local_dir, kill_after, delay) for kill_after, delay in plan]
        repeated = ", ".join(str(r["repeated"]) for r in results)
        tiers = ", ".join(str(r["tier"]) for r in results)
        saves = [s for r in results for s in r["saves"][1:]]  # type: ignore[index]
        first = statistics.median(r["saves"][0][1] for r in results if r["saves"])  # type: ignore[index]
        for tier in ("durable", "local"):
            times = [seconds for t, seconds in saves if t == tier]
            if not times:
                continue
            median = statistics.median(times)
            print(f"| {config} | {tier} | {len(times)} | {median * 1e3:.1f} | {_p95(times) * 1e3:.1f} | "
                  f"{median / args.step_time:.3f} | {repeated} | {tiers} |")  # fmt: skip
        print(f"| {config} | first save of a process | {len(results)} | {first * 1e3:.1f} | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
