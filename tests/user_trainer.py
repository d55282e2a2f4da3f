r"""A user's own trainer, written from the documentation alone: the healing paths are judged on it.

It is deliberately *not* the demo's toy job and shares no code with it: a small conv net, DDP over
gloo, AdamW with a linear warm-up then cosine decay (or a constant learning rate), and only the
documented client API — `Reporter.from_env`, `AdaptiveClipper`, `CheckpointManager`,
`ModelOptimizerState`, `PlannedInterrupt`, `ControlState.should_skip`, `init_process_group`,
`Reporter.clip_in_use`. It never checks its own parameters for NaN and never refuses a checkpoint
itself: whatever protects it must be the library's.

Faults come from outside: the test writes the data file (a batch of NaNs or of huge values is a
poisoned batch), SIGSTOPs or SIGKILLs a rank, and reads the result. The batch index is the step, as
docs/CLIENT.md asks, so the daemon's `skip_batches` name batches.

    python -m torch.distributed.run --nproc-per-node 2 tests/user_trainer.py \
        --data /tmp/d --steps 200 --ckpt-dir /tmp/ckpt --out /tmp/out

Output on stdout (rank 0): ``RESUMED <step>``, ``SKIP <step>``, ``STEP <step> <loss>`` and at the end
``FINAL <sha256> finite=<0|1>``; `--out` gets ``final.json`` with the digest and whether every
parameter is finite.

With ``--rollback-every N`` the loop is the documented rollback loop (`Snapshotter.steps` and
`after_step`, the reporter advertising the capability): rank 0 prints ``ROLLBACK <at> <to> <skipped>``
and `--out` also gets ``final.pt`` (rank 0's parameters) and ``rank<r>.json`` (pid, rollbacks, skipped
batches); without it too, `--out` gets ``final.pt``, so a rollback is judged against a plain run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer_output import say, state_digest
from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.distributed import init_process_group
from trainwarden.client.interrupt import PlannedInterrupt
from trainwarden.client.reporter import Reporter
from trainwarden.client.snapshot import Snapshotter
from trainwarden.control import ClipSettings

BATCH = 8
IMAGE = (1, 8, 8)
CLASSES = 4


def write_data(path: Path, steps: int, world: int, seed: int, poison: dict[int, tuple[str, int]]) -> None:
    """Write the data file: `poison` maps a batch index to ("nan" | "spike", the rank whose slice is bad)."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((steps, world, BATCH, *IMAGE), dtype=np.float32)
    labels = rng.integers(0, CLASSES, (steps, world, BATCH), dtype=np.int64)
    for step, (kind, rank) in poison.items():
        if kind == "nan":
            inputs[step, rank] = np.nan
        elif kind == "spike":
            inputs[step, rank] *= 1000.0
        else:
            raise ValueError(f"unknown poison {kind!r}")
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "inputs.npy", inputs)
    np.save(path / "labels.npy", labels)


class Net(nn.Module):
    """Two convolutions, dropout and a linear head: small, but with RNG use and real gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.1),
        )
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def schedule(kind: str, steps: int, warmup: int):
    """Linear warm-up then cosine decay to 10 %, or a constant factor."""
    if kind == "constant":
        return lambda _s: 1.0

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def digest(model: nn.Module) -> tuple[str, bool]:
    """sha256 of every parameter's bytes, and whether all are finite."""
    return state_digest(model.state_dict())


def main() -> int:  # noqa: C901 - a training loop, read top to bottom
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--ckpt-dir", type=Path)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--job", help="job name for the reporter (default: the launcher's)")
    parser.add_argument("--rollback-every", type=int, default=0, help="snapshot interval (0: no rollback)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    init_process_group("gloo")
    rank = dist.get_rank()
    # After the process group, before anything slow: a SIGTERM from here on checkpoints and exits.
    capabilities = Snapshotter.CAPABILITIES if args.rollback_every else ()
    reporter = Reporter.from_env(job=args.job, capabilities=capabilities)
    guard = PlannedInterrupt((signal.SIGTERM, signal.SIGUSR1), reporter=reporter).install()

    inputs = np.load(args.data / "inputs.npy", mmap_mode="r")
    labels = np.load(args.data / "labels.npy", mmap_mode="r")
    torch.manual_seed(args.seed)
    model = Net()
    torch.manual_seed(args.seed + 1 + rank)  # per-rank dropout streams
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args.schedule, args.steps, args.warmup))
    clipper = AdaptiveClipper(model.parameters(), ClipSettings())
    state = {"train": ModelOptimizerState(model, optimizer), "scheduler": scheduler}
    snap = None
    if args.rollback_every:
        snap = Snapshotter(
            {"model": model, "optimizer": optimizer, "scheduler": scheduler, "clipper": clipper},
            every=args.rollback_every,
            reporter=reporter,
        )

    start = 0
    manager = None
    if args.ckpt_dir is not None:
        manager = CheckpointManager(args.ckpt_dir, keep_last=3, reporter=reporter)
        resume = manager.load_latest(state)
        if resume is not None:
            start = int(resume.data_position["next_batch"])
            clipper.load_state_dict(resume.local["clipper"])
            guard.load_state_dict(resume.local["interrupt"])
            if snap is not None and "snapshot" in resume.local:
                snap.load_state_dict(resume.local["snapshot"])
            if rank == 0:
                say(f"RESUMED {resume.step}")
    # Read once before the first step, so every rank skips the same batches (docs/CLIENT.md).
    control = reporter.poll_control()
    if control.clip is not None:
        clipper.update(control.clip)
    reporter.clip_in_use(clipper.settings)

    loss_fn = nn.CrossEntropyLoss()
    steps = snap.steps(start, args.steps) if snap is not None else range(start, args.steps)
    for step in steps:
        if control.should_skip(step):
            if rank == 0:
                say(f"SKIP {step}")
            continue
        x = torch.from_numpy(np.array(inputs[step, rank]))
        y = torch.from_numpy(np.array(labels[step, rank]))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        loss.backward()
        grad_norm = clipper.clip()
        optimizer.step()
        scheduler.step()
        reporter.step(step, loss=loss.detach(), grad_norm=grad_norm, lr=scheduler.get_last_lr()[0])
        if rank == 0:
            say(f"STEP {step} {float(loss):.6f}")
        if snap is not None and snap.after_step(step, loss=loss.detach(), grad_norm=grad_norm):
            if rank == 0:
                last = snap.rollbacks[-1]
                say(f"ROLLBACK {last.at_step} {last.next_step} {last.skipped}")
            continue  # the loop goes on from the snapshot; this step's state is gone
        boundary = guard.at_boundary(step)
        if boundary.clip is not None:
            clipper.update(boundary.clip)
            reporter.clip_in_use(clipper.settings)
        periodic = (step + 1) % args.ckpt_every == 0
        if manager is not None and (periodic or boundary.checkpoint):
            manager.save(
                step,
                state,
                data_position={"next_batch": step + 1},
                local={
                    "clipper": clipper.state_dict(),
                    "interrupt": guard.state_dict(),
                    **({"snapshot": snap.state_dict()} if snap is not None else {}),
                },
            )
        if boundary.stop:
            if manager is not None:
                manager.wait()
            reporter.close()
            guard.exit()
        if args.step_sleep:
            time.sleep(args.step_sleep)

    if manager is not None:
        manager.close()
    sha, finite = digest(model)
    if snap is not None and args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        rollbacks = [[r.at_step, r.next_step, r.skipped] for r in snap.rollbacks]
        record = {"pid": os.getpid(), "rollbacks": rollbacks, "skipped": list(snap.skipped)}
        (args.out / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    if args.out is not None and rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.out / "final.pt")
    if rank == 0:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "final.json").write_text(
                json.dumps({"sha256": sha, "finite": finite}), encoding="utf-8"
            )
        say(f"FINAL {sha} finite={int(finite)}")
    reporter.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
