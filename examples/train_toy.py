"""A tiny CPU training job that uses the whole trainwarden client: reporting, clipping, checkpoints.

Run it under torchrun with two ranks (gloo, DDP)::

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 --master-port 29611 \\
        examples/train_toy.py --steps 60 --ckpt-dir /tmp/toy-ckpt --ckpt-every 10 --out /tmp/toy-out

Kill it at any moment and start the same command again: it resumes from the newest valid
checkpoint and ends with parameters bit-identical to an uninterrupted run (`--out` writes
`final.pt` and `final.sha256`). Send SIGUSR1 or SIGTERM to any rank (or write a stop request into
the control file) and it checkpoints at the next step boundary and exits with status 75.

The data is synthetic and deterministic: a fixed pool of samples, reshuffled each epoch from the
seed; each rank reads its own slice. Its position is saved with the checkpoint, and the batch
augmentation draws from Python's, NumPy's and torch's global generators (and the model uses
dropout) so an exact resume really depends on the RNG states being restored.

Fault injection for end-to-end tests (all off by default, on `--fault-rank` only):
`--crash-at-step`, `--hang-at-step`, `--nan-at-step`, `--spike-at-step`, and
`--ckpt-write-delay` (pause inside every checkpoint write, after the shards and before the
manifest, printing ``CKPT_WRITING <step>``).
"""

# The data augmentation draws from NumPy's legacy global generator on purpose: exact resume must restore it.
# ruff: noqa: NPY002

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.interrupt import PlannedInterrupt
from trainwarden.control import ClipSettings

log = logging.getLogger("train_toy")

IN_FEATURES = 16
CLASSES = 4
POOL = 512


class SyntheticData:
    """Deterministic batches: a fixed pool, an epoch-seeded shuffle, one slice per rank."""

    def __init__(self, seed: int, rank: int, world: int, batch: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(POOL, IN_FEATURES, generator=gen)
        weights = torch.randn(IN_FEATURES, CLASSES, generator=gen)
        self.y = (self.x @ weights).argmax(dim=1)
        self.seed, self.rank, self.world, self.batch = seed, rank, world, batch
        self.per_epoch = POOL // (batch * world)
        self.epoch = 0
        self.index = 0
        self._order = self._shuffle()

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(POOL, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._shuffle()
        start = (self.index * self.world + self.rank) * self.batch
        ids = self._order[start : start + self.batch]
        self.index += 1
        x = self.x[ids].clone()
        # Augmentation from the three global generators, so resume must restore all of them.
        x += torch.randn_like(x) * 0.05
        x += torch.from_numpy(np.random.normal(0.0, 0.05, size=tuple(x.shape)).astype(np.float32))
        if random.random() < 0.5:
            x = x.flip(0)
            return x, self.y[ids].flip(0)
        return x, self.y[ids]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle()


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, CLASSES),
    )


def params_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def make_reporter(job: str) -> Any:
    """The daemon's reporter when the client module is there; an absent daemon is fine."""
    try:
        from trainwarden.client.reporter import Reporter  # noqa: PLC0415

        return Reporter.from_env(job=job)
    except Exception as exc:
        log.warning("reporting disabled: %s", exc)
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--job", default=os.environ.get("TRAINWARDEN_JOB", "toy"), help="job name for the daemon")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint root (resume from it if present)")
    p.add_argument("--ckpt-every", type=int, default=10, help="save every N steps (0: only on request)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--async-ckpt", action="store_true", help="write checkpoints on a background thread")
    p.add_argument("--clip", choices=["reciprocal", "zscore", "fixed", "none"], default="reciprocal")
    p.add_argument("--out", type=Path, default=None, help="write final.pt and final.sha256 here")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--fault-rank", type=int, default=0, help="rank the faults below apply to")
    p.add_argument("--crash-at-step", type=int, default=None, help="exit with status 1 at this step")
    p.add_argument("--hang-at-step", type=int, default=None, help="stop making progress at this step")
    p.add_argument("--nan-at-step", type=int, default=None, help="make the loss NaN at this step")
    p.add_argument("--spike-at-step", type=int, default=None, help="scale the batch 1000x at this step")
    p.add_argument("--ckpt-write-delay", type=float, default=0.0, help="pause inside each checkpoint write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:  # noqa: C901, PLR0912, PLR0915 - a training loop, read top to bottom
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
    )
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    model = build_model(args.seed)
    torch.manual_seed(args.seed + 17 * rank)  # per-rank dropout and augmentation streams
    ddp: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    data = SyntheticData(args.seed, rank, world, args.batch_size)
    clipper = None
    if args.clip != "none":
        clipper = AdaptiveClipper(model.parameters(), ClipSettings(warmup_steps=10), mode=args.clip)
    reporter = make_reporter(args.job)
    guard = PlannedInterrupt((signal.SIGTERM, signal.SIGUSR1), reporter=reporter).install()

    def write_pause(tmp: Path) -> None:
        print(f"CKPT_WRITING {tmp.name}", flush=True)
        time.sleep(args.ckpt_write_delay)

    manager = None
    state: dict[str, Any] = {"train": ModelOptimizerState(model, optimizer), "scheduler": scheduler}
    start = 0
    if args.ckpt_dir is not None:
        manager = CheckpointManager(
            args.ckpt_dir,
            keep_last=args.keep,
            keep_best=1,
            async_save=args.async_ckpt,
            reporter=reporter,
            on_written=write_pause if args.ckpt_write_delay > 0 else None,
        )
        resume = manager.load_latest(state)
        if resume is not None:
            start = resume.step + 1
            data.load_state_dict(resume.data_position)
            if clipper is not None and "clipper" in resume.local:
                clipper.load_state_dict(resume.local["clipper"])
            guard.load_state_dict(resume.local.get("interrupt", {}))
            print(f"RESUMED {resume.step}", flush=True)

    def save(step: int, loss: float) -> None:
        assert manager is not None
        local = {"interrupt": guard.state_dict()}
        if clipper is not None:
            local["clipper"] = clipper.state_dict()
        manager.save(step, state, data_position=data.state_dict(), local=local, metric=loss)

    loss_fn = nn.CrossEntropyLoss()
    faulty = rank == args.fault_rank
    for step in range(start, args.steps):
        if faulty and step == args.crash_at_step:
            print(f"CRASH {step}", flush=True)
            os._exit(1)
        if faulty and step == args.hang_at_step:
            print(f"HANG {step}", flush=True)
            while True:
                time.sleep(3600)
        x, y = data.next()
        if faulty and step == args.spike_at_step:
            x = x * 1000.0
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        if faulty and step == args.nan_at_step:
            loss = loss * float("nan")
        loss.backward()
        grad_norm = clipper.clip() if clipper is not None else None
        optimizer.step()
        scheduler.step()
        if reporter is not None:
            reporter.step(
                step,
                loss=loss.detach(),
                grad_norm=grad_norm,
                lr=scheduler.get_last_lr()[0],
                samples=args.batch_size * world,
            )
        if rank == 0:
            print(f"STEP {step} loss={loss.item():.6f}", flush=True)
        boundary = guard.at_boundary(step)
        if clipper is not None and boundary.control is not None and boundary.control.clip is not None:
            clipper.update(boundary.control.clip)
        periodic = args.ckpt_every > 0 and (step + 1) % args.ckpt_every == 0
        if manager is not None and (periodic or boundary.checkpoint):
            save(step, float(loss.item()))
        if boundary.stop:
            if manager is not None:
                manager.wait()
            print(f"STOPPED {step} {boundary.reason}", flush=True)
            if reporter is not None:
                reporter.close()
            guard.exit()
        if args.step_sleep:
            time.sleep(args.step_sleep)

    if manager is not None:
        manager.close()
    if rank == 0 and args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.out / "final.pt")
        digest = params_sha256(model)
        (args.out / "final.sha256").write_text(digest + "\n", encoding="utf-8")
        (args.out / "final.json").write_text(
            json.dumps({"steps": args.steps, "sha256": digest}), encoding="utf-8"
        )
        print(f"FINAL {digest}", flush=True)
    if reporter is not None:
        reporter.close()
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
