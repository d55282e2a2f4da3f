"""What in-place rollback costs a fault-free run, and how long a NaN costs when it happens.

One process on CPU, the demo toy's model (MLP with dropout, AdamW, LambdaLR warm-up, the
AdaptiveClipper), and a larger MLP of about 2.7 M parameters to show how the cost grows with the
state. Per round, the same training steps run without a `Snapshotter` (the baseline), with one at
`every=5` (the default), at `every=5` with the job-side loss-spike check (`spike=SpikeCheck()`,
its losses in the boundary's all-reduce and the detector at each boundary) and at `every=1`; they
alternate round by round, so a change of the
machine's load hits all alike. The extra seconds per step over the baseline are reported as a
ratio of the baseline's own compute step and of the toy's 0.1 s step (its `--step-sleep`), with
the snapshot's host memory (`keep=2` snapshots). Costs are the process's CPU time (one thread), so
the load of other processes on a shared machine does not count as snapshot cost.

Recovery: the toy model stepping every 0.1 s, a NaN batch at each position within the snapshot
interval in turn; the time from the end of the NaN step to the end of the first good step after
the rollback (detection at the next boundary, restore, one replayed step), and the steps replayed.

    .venv/bin/python bench/snapshot_cost.py              # prints Markdown tables
    .venv/bin/python bench/snapshot_cost.py --rounds 9 --steps 200   # longer, steadier

Targets (issue 12): <= 2 % of the toy's step at the default interval; NaN to training again <= 1 s,
no process restart.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.snapshot import Snapshotter
from trainwarden.client.spike_check import SpikeCheck
from trainwarden.control import ClipSettings
from trainwarden.demo.toy_job import CLASSES, IN_FEATURES, build_model

TOY_STEP_SECONDS = 0.1
BATCH = 32


def big_model(seed: int) -> nn.Module:
    """An MLP of about 2.7 M parameters (width 1024)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024),
        nn.ReLU(), nn.Linear(1024, CLASSES),
    )  # fmt: skip


class Trainer:
    """Model, optimizer, scheduler and clipper of one run; `step(i)` trains on batch i."""

    def __init__(self, make: Callable[[int], nn.Module], steps: int) -> None:
        self.model = make(0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 50))
        self.clipper = AdaptiveClipper(self.model.parameters(), ClipSettings())
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(steps, BATCH, IN_FEATURES, generator=gen)
        self.y = torch.randint(0, CLASSES, (steps, BATCH), generator=gen)
        self.loss_fn = nn.CrossEntropyLoss()

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optim": self.optimizer, "sched": self.scheduler, "clip": self.clipper}

    def step(self, i: int, *, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i].clone()
        if poison:
            x[0, 0] = math.nan
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), self.y[i])
        loss.backward()
        norm = self.clipper.clip()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), norm


def timed_run(
    make: Callable[[int], nn.Module], steps: int, every: int | None, *, spike: bool = False
) -> float:
    """CPU seconds of this process for `steps` steps, with a Snapshotter at `every` (None: without).

    CPU time, not wall time: on a shared, loaded machine the wall clock mostly measures the other
    processes, while one training thread's CPU time is what the step and the snapshots cost.
    """
    trainer = Trainer(make, steps)
    if every is None:
        started = time.process_time()
        for i in range(steps):
            trainer.step(i)
        return time.process_time() - started
    snap = Snapshotter(trainer.state(), every=every, spike=SpikeCheck() if spike else None)
    started = time.process_time()
    for i in snap.steps(0, steps):
        loss, norm = trainer.step(i)
        snap.after_step(i, loss=loss, grad_norm=norm)
    return time.process_time() - started


def snapshot_bytes(make: Callable[[int], nn.Module]) -> int:
    """Host bytes of one snapshot after a few steps (the optimizer's moments exist by then)."""
    trainer = Trainer(make, 3)
    for i in range(3):
        trainer.step(i)
    snap = Snapshotter(trainer.state(), every=1)
    taken = snap._take(0)  # noqa: SLF001 - the bench measures the snapshot itself
    return sum(_tensor_bytes(v) for v in taken.states.values())


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def cost_table(rounds: int, steps: int) -> list[str]:
    header = (
        "| model | parameters | snapshot memory (keep=2) | baseline step (CPU) | every=5: extra per step"
        " | ratio of step | ratio of 0.1 s | every=5 + spike check: extra per step | ratio of 0.1 s"
        " | every=1: extra per step | ratio of 0.1 s |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, make in (("toy MLP", build_model), ("MLP 1024", big_model)):
        params = sum(p.numel() for p in make(0).parameters())
        kinds: dict[str, tuple[int | None, bool]] = {"none": (None, False), "5": (5, False)}
        kinds |= {"5+spike": (5, True), "1": (1, False)}
        runs: dict[str, list[float]] = {kind: [] for kind in kinds}
        timed_run(make, 20, 5, spike=True)  # warm-up: allocator, first-call paths
        for _ in range(rounds):
            for kind, (every, spike) in kinds.items():
                runs[kind].append(timed_run(make, steps, every, spike=spike) / steps)
        base = statistics.median(runs["none"])
        extra5 = statistics.median(runs["5"]) - base
        extra5s = statistics.median(runs["5+spike"]) - base
        extra1 = statistics.median(runs["1"]) - base
        memory = 2 * snapshot_bytes(make)
        rows.append(
            f"| {name} | {params:,} | {memory / 2**20:.2f} MiB | {base * 1e3:.3f} ms "
            f"| {extra5 * 1e3:.3f} ms | {extra5 / base:.1%} | {extra5 / TOY_STEP_SECONDS:.2%} "
            f"| {extra5s * 1e3:.3f} ms | {extra5s / TOY_STEP_SECONDS:.2%} "
            f"| {extra1 * 1e3:.3f} ms | "
            f"{extra1 / TOY_STEP_SECONDS:.2%} |"
        )
    return rows


def recovery_table(every: int) -> list[str]:
    rows = [
        "| NaN at step (boundary every 5) | rollback at step | NaN to first good step | steps replayed |",
        "|---|---|---|---|",
    ]
    worst = 0.0
    for offset in range(every):
        bad = 20 + offset
        trainer = Trainer(build_model, 40)
        snap = Snapshotter(trainer.state(), every=every)
        nan_done = first_good = None
        found = replayed = 0
        for i in snap.steps(0, 40):
            loss, norm = trainer.step(i, poison=i == bad and not snap.rollbacks)
            time.sleep(TOY_STEP_SECONDS)  # the toy's step
            if i == bad and nan_done is None:
                nan_done = time.perf_counter()
            if snap.rollbacks and first_good is None:
                first_good = time.perf_counter()
            if snap.after_step(i, loss=loss, grad_norm=norm):
                rollback = snap.rollbacks[-1]
                found, replayed = rollback.at_step, rollback.at_step - rollback.next_step
        assert nan_done is not None
        assert first_good is not None
        seconds = first_good - nan_done
        worst = max(worst, seconds)
        rows.append(f"| {bad} | {found} | {seconds:.3f} s | {replayed} |")
    rows.append(f"| **worst** | | **{worst:.3f} s** | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("\n".join(cost_table(args.rounds, args.steps)))
    print()
    print("\n".join(recovery_table(5)))


if __name__ == "__main__":
    main()
