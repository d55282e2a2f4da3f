"""What the node-local checkpoint tier buys and costs: blocking time per save, steps repeated on a crash.

Configurations in one run, on the same model, step time and crash times:
  - durable only: `CheckpointManager(durable, async_save=True, durable_every=D)`;
  - tiered: the same plus `local_dir=/dev/shm/trainwarden/<bench job>, local_every=L`, with L = 5
    (the write fits in the interval) and L = 1 (it does not), with the default
    ``local_when_busy="skip"`` (a local save due while a write is in flight is skipped) and, at
    L = 1, with ``"wait"`` (it waits for the previous write, as before; the copy into reused host
    buffers is the same);
  - with ``--against REV`` (e.g. the commit before the change), durable only and tiered L = 1 once
    more on the client code of that commit (``git archive`` of ``src/trainwarden`` into a temp
    directory, first on the worker's ``PYTHONPATH``): the old path, side by side in the same run.
A worker process trains (steps padded to `--step-time`, one `save()` per step boundary) and is
SIGKILLed after a seeded random number of steps, at a seeded random point inside a step; a
second process resumes and says from which step and tier. Steps repeated = the steps the killed
run had finished beyond the step resumed from. Blocking time per save = the wall time of the
`save()` calls that wrote something (the background write is not counted: that is the point),
as a median and p95, and as a share of the step time; the first save of each process (DCP's
warm-up, paid once per process whatever the tier) is left out and shown apart. Skipped local
saves are counted (`manager.local_skipped`), with the median time such a `save()` took.

Usage: .venv/bin/python bench/checkpoint_tiers.py [--crashes 4] [--width 1024] [--layers 4]
       [--step-time 0.1] [--durable-every 10] [--seed 1] [--against REV]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = (
    ("durable only", 0, "skip", True),
    ("durable only", 0, "skip", False),
    ("tiered", 1, "wait", True),
    ("tiered", 1, "wait", False),
    ("tiered", 1, "skip", False),
    ("tiered", 5, "skip", False),
)
"""(name, local_every, local_when_busy, on the `--against` commit's code)."""


def worker(args: argparse.Namespace) -> int:
    """Train until killed (or `--steps`), or only resume (`--resume-only`); print what happened."""
    import torch  # noqa: PLC0415

    from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    local: dict[str, Any] = {}
    if args.local_dir is not None:
        local = {"local_dir": args.local_dir, "local_every": args.local_every}
        if not args.old_code:  # the old code had no choice: it waited
            local["local_when_busy"] = args.local_when_busy
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
        skipped = getattr(manager, "local_skipped", 0)
        path = manager.save(step, state)
        blocked = time.perf_counter() - save_began
        if getattr(manager, "local_skipped", 0) > skipped:
            print(f"SKIP {step} {blocked:.6f}", flush=True)
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
    cmd += ["--local-when-busy", args.local_when_busy] + (["--old-code"] if args.old_code else [])
    if local_dir is not None:
        cmd += ["--local-dir", str(local_dir)]
    return [*cmd, *extra]


def old_code(rev: str, into: Path) -> Path:
    """The ``src`` directory of `rev`'s client code, extracted under `into` (for ``PYTHONPATH``)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "src/trainwarden"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def trial(
    args: argparse.Namespace, local_dir: Path | None, kill_after: int, delay: float, src: Path
) -> dict[str, object]:
    """One crash: train, SIGKILL after `kill_after` steps (+ `delay` s), resume; what it cost."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "durable"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(src))
        proc = subprocess.Popen(
            _command(args, root, local_dir, "--steps", "100000"), stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        saves: list[tuple[str, float]] = []
        skips: list[float] = []
        last = -1
        for line in proc.stdout:
            if match := re.match(r"SAVE (\d+) (\w+) ([\d.]+)", line):
                saves.append((match.group(2), float(match.group(3))))
            elif match := re.match(r"SKIP (\d+) ([\d.]+)", line):
                skips.append(float(match.group(2)))
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
            "skips": skips,
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
    p.add_argument("--local-when-busy", default="skip", help=argparse.SUPPRESS)
    p.add_argument("--old-code", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--against", default=None, help="also run the old path on this commit's client code")
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
          "| local saves skipped (median ms) | steps repeated per crash | resumed from |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as old_tree:
        old_src = None if args.against is None else old_code(args.against, Path(old_tree))
        for name, local_every, when_busy, on_old in CONFIGS:
            if on_old and old_src is None:
                continue
            args.local_every, args.local_when_busy, args.old_code = max(1, local_every), when_busy, on_old
            config = _config_name(name, local_every, when_busy, args.against if on_old else None)
            local_dir = Path(f"/dev/shm/trainwarden/bench-tiers-{os.getpid()}") if local_every else None
            src = old_src if on_old and old_src is not None else REPO / "src"
            _report(args, config, [trial(args, local_dir, kill, delay, src) for kill, delay in plan])
    return 0


def _config_name(name: str, local_every: int, when_busy: str, rev: str | None) -> str:
    if rev is not None:
        return f"{name}{f', local every {local_every}' if local_every else ''} (code of {rev})"
    if not local_every:
        return name
    return f"{name}, local every {local_every}, {when_busy}"


def _report(args: argparse.Namespace, config: str, results: list[dict[str, object]]) -> None:
    """The table rows of one configuration: per tier, then the first save of each process."""
    repeated = ", ".join(str(r["repeated"]) for r in results)
    tiers = ", ".join(str(r["tier"]) for r in results)
    saves = [s for r in results for s in r["saves"][1:]]  # type: ignore[index]
    skips = [s for r in results for s in r["skips"]]  # type: ignore[attr-defined]
    skipped = f"{len(skips)} ({statistics.median(skips) * 1e3:.2f})" if skips else "0"
    first = statistics.median(r["saves"][0][1] for r in results if r["saves"])  # type: ignore[index]
    for tier in ("durable", "local"):
        times = [seconds for t, seconds in saves if t == tier]
        if not times:
            continue
        median = statistics.median(times)
        print(f"| {config} | {tier} | {len(times)} | {median * 1e3:.1f} | {_p95(times) * 1e3:.1f} | "
              f"{median / args.step_time:.3f} | {skipped if tier == 'local' else ''} | {repeated} "
              f"| {tiers} |")  # fmt: skip
    print(f"| {config} | first save of a process | {len(results)} | {first * 1e3:.1f} | | | | | |")


if __name__ == "__main__":
    raise SystemExit(main())
