"""False spikes on healthy runs, and real ones caught: the `spike` rule with its DEFAULT options.

A small conv net (two 3x3 conv layers of 8 and 16 channels, global pooling, a linear head; ~1.4 k
parameters) learns a synthetic 10-class image task on CPU with AdamW, batch 32, under several LR
schedules x seeds. Every step's loss and pre-clip grad norm is recorded, then fed, one record per
step at `STEP_SECONDS` apart, into a real `Store` exactly as the training collector does, and the
real `SpikeRule` is evaluated at each tick (every `TICK_STEPS` steps, as the daemon's 1 s tick).

- clean run: the number of ticks at which the rule asserts a finding (must be 0);
- bad run (same seed, same batches): at each of the `--bad-at` steps the batch is replaced by one
  with inputs scaled by `--bad-scale` and labels rotated, a bad batch as a data bug makes it; the
  table gives the grad-norm and loss jump it caused (x the previous step) and whether the rule
  flagged it within 3 ticks of the bad step.
- the job-side check (`Snapshotter(..., spike=SpikeCheck())`, its defaults, a boundary every
  `ROLLBACK_EVERY` steps) in the same training loops: the clean run trains under it (a run it never
  rolls back is bit-identical to one without it), so its rollbacks are false positives (must be 0);
  a third run of the bad batches under it says which it rolled back (the bad step skipped) and
  whether it rolled back anything else.

Schedules: `constant`, `warmup_cosine` (linear warm-up over the first 10 % then cosine decay to
0), `warmup_linear` (warm-up, then linear decay), `step` (x0.1 at 50 % and 75 %).

Run::

    .venv/bin/python bench/spike_false_positives.py                   # Markdown table
    .venv/bin/python bench/spike_false_positives.py --save-fixtures tests/fixtures/spike_series
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from training_series import TrainingFeed
from trainwarden.client.snapshot import Snapshotter
from trainwarden.client.spike_check import SpikeCheck
from trainwarden.rules.base import RuleView
from trainwarden.rules.spike import SpikeRule
from trainwarden.store import Store

STEP_SECONDS = 0.1
TICK_STEPS = 10
DETECT_TICKS = 3
RECENT_STEPS = round(SpikeRule.Options().recent_seconds / STEP_SECONDS)
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "step")
ROLLBACK_EVERY = 5


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


def make_data(seed: int, steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Class templates (random 12x12 patterns) plus noise: learnable, never trivially."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 12, 12, generator=gen)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 10, (batch,), generator=gen)
        images = templates[labels] + 1.5 * torch.randn(batch, 1, 12, 12, generator=gen)
        batches.append((images, labels))
    return batches


def lr_at(schedule: str, step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 10)
    if schedule == "constant":
        return peak
    if schedule == "step":
        return peak * (0.1 ** ((step >= steps // 2) + (step >= 3 * steps // 4)))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    if schedule == "warmup_cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)


@dataclass
class Series:
    loss: list[float]
    grad_norm: list[float]
    rollbacks: list[tuple[int, int]]  # (skipped step, step it was found at) under the job-side check


def train(
    seed: int,
    schedule: str,
    steps: int,
    bad: Callable[[int], bool],
    bad_scale: float,
    peak_lr: float,
    *,
    check: bool = False,
) -> Series:
    """One run; with `check`, under the job-side spike check (the series: the final lineage, by step)."""
    torch.manual_seed(seed)
    model = SmallConvNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    snap = Snapshotter({"model": model, "optim": optimizer}, every=ROLLBACK_EVERY, spike=SpikeCheck())
    data = make_data(seed, steps, 32)
    losses: dict[int, float] = {}
    norms: dict[int, float] = {}
    for step in snap.steps(0, steps) if check else range(steps):
        clean_images, clean_labels = data[step]
        images, labels = clean_images, clean_labels
        if bad(step):
            images, labels = clean_images * bad_scale, clean_labels.roll(1)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(schedule, step, steps, peak_lr)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        optimizer.step()
        losses[step], norms[step] = float(loss.detach()), float(norm)
        if check:
            snap.after_step(step, loss=loss.detach(), grad_norm=norm)
    kept = sorted(set(losses) - set(snap.skipped))
    return Series(
        [losses[s] for s in kept],
        [norms[s] for s in kept],
        [(r.skipped, r.at_step) for r in snap.rollbacks],
    )


def flagged_ticks(series: Series) -> list[int]:
    """Steps at whose tick the default spike rule asserts a finding."""
    store = Store(window_seconds=600.0)
    feed = TrainingFeed(store, job="bench")
    rule = SpikeRule(SpikeRule.Options())
    ticks = []
    for step, (loss, norm) in enumerate(zip(series.loss, series.grad_norm, strict=True)):
        at = (step + 1) * STEP_SECONDS
        feed.step(0, at, STEP_SECONDS, loss=loss, grad_norm=norm)
        if (step + 1) % TICK_STEPS == 0 and rule.evaluate(RuleView(store), at + 0.01):
            ticks.append(step)
    return ticks


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    bad_steps = set(args.bad_at)
    for schedule in args.schedules:
        for seed in args.seeds:
            started = time.perf_counter()
            clean = train(seed, schedule, args.steps, lambda _s: False, 1.0, args.lr, check=True)
            dirty = train(seed, schedule, args.steps, lambda s: s in bad_steps, args.bad_scale, args.lr)
            healed = train(
                seed, schedule, args.steps, lambda s: s in bad_steps, args.bad_scale, args.lr, check=True
            )
            skipped = [s for s, _ in healed.rollbacks]
            dirty_ticks = flagged_ticks(dirty)
            caught = [any(b <= t < b + DETECT_TICKS * TICK_STEPS for t in dirty_ticks) for b in args.bad_at]
            # a finding stays asserted while its point is in the rule's recent window
            explained = RECENT_STEPS + TICK_STEPS
            jumps_g = [dirty.grad_norm[b] / dirty.grad_norm[b - 1] for b in args.bad_at]
            jumps_l = [dirty.loss[b] / dirty.loss[b - 1] for b in args.bad_at]
            rows.append(
                {
                    "schedule": schedule,
                    "seed": seed,
                    "clean_flagged_ticks": len(flagged_ticks(clean)),
                    "grad_norm_first_last": (clean.grad_norm[0], max(clean.grad_norm), clean.grad_norm[-1]),
                    "loss_first_last": (clean.loss[0], clean.loss[-1]),
                    "bad_grad_jump": jumps_g,
                    "bad_loss_jump": jumps_l,
                    "caught": caught,
                    "false_ticks_bad_run": sum(
                        not any(b <= t < b + explained for b in args.bad_at) for t in dirty_ticks
                    ),
                    "job_side_clean_rollbacks": len(clean.rollbacks),
                    "job_side_caught": [b in skipped for b in args.bad_at],
                    "job_side_other_rollbacks": sum(s not in bad_steps for s in skipped),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            if args.save_fixtures and seed in args.fixture_seeds:
                folder = Path(args.save_fixtures)
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{schedule}-seed{seed}.json"
                path.write_text(
                    json.dumps(
                        {
                            "model": "SmallConvNet (bench/spike_false_positives.py), AdamW, batch 32",
                            "schedule": schedule,
                            "seed": seed,
                            "peak_lr": args.lr,
                            "loss": [round(v, 6) for v in clean.loss],
                            "grad_norm": [round(v, 6) for v in clean.grad_norm],
                        }
                    )
                    + "\n",
                    encoding="utf-8",
                )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    header = (
        "| schedule | seed | findings, clean run (ticks) | grad norm first / max / last | bad batches caught"
        " | grad-norm jump (x prev) | loss jump (x prev) | other findings, bad run"
        " | job-side rollbacks, clean run | bad batches rolled back | other rollbacks, bad run |"
    )
    lines = [
        header,
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["grad_norm_first_last"]
        assert isinstance(g, tuple)
        caught = r["caught"]
        assert isinstance(caught, list)
        jumps_g = r["bad_grad_jump"]
        jumps_l = r["bad_loss_jump"]
        assert isinstance(jumps_g, list)
        assert isinstance(jumps_l, list)
        job_caught = r["job_side_caught"]
        assert isinstance(job_caught, list)
        lines.append(
            f"| {r['schedule']} | {r['seed']} | {r['clean_flagged_ticks']} "
            f"| {g[0]:.2f} / {g[1]:.2f} / {g[2]:.2f} "
            f"| {sum(caught)}/{len(caught)} | {', '.join(f'{j:.1f}' for j in jumps_g)} "
            f"| {', '.join(f'{j:.1f}' for j in jumps_l)} | {r['false_ticks_bad_run']} "
            f"| {r['job_side_clean_rollbacks']} | {sum(job_caught)}/{len(job_caught)} "
            f"| {r['job_side_other_rollbacks']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bad-at", nargs="+", type=int, default=[300, 600])
    parser.add_argument("--bad-scale", type=float, default=20.0)
    parser.add_argument("--save-fixtures", default="")
    parser.add_argument("--fixture-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
