r"""A user's FSDP2 trainer, written from the documentation alone: sharded training under trainwarden.

Like tests/user_trainer.py (and reading the same data files), but the model is sharded with
`torch.distributed.fsdp.fully_shard` (FSDP2: parameters, gradients and optimizer state are
DTensors, each rank holding one shard), on gloo, on CPU. Only the documented client API is used:
`Reporter.from_env`, `AdaptiveClipper` (global norm across the shards), `CheckpointManager` with
`ModelOptimizerState` (sharded state through torch.distributed.checkpoint), `PlannedInterrupt`,
`ControlState.should_skip`, `init_process_group`, `Reporter.clip_in_use`.

    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_trainer.py \
        --data /tmp/d --steps 200 --ckpt-dir /tmp/ckpt --out /tmp/out

Output on stdout (rank 0): ``RESUMED <step>``, ``SKIP <step>``, ``SAVED <step>``,
``STEP <step> <loss>`` and at the end ``FINAL <sha256> finite=<0|1>``; `--out` gets
``final.json`` with the digest of the full (unsharded) parameters and whether all are finite.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from trainer_output import say, state_digest
from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.distributed import init_process_group
from trainwarden.client.interrupt import PlannedInterrupt
from trainwarden.client.reporter import Reporter
from trainwarden.control import ClipSettings

CLASSES = 4


class Net(nn.Module):
    """An MLP over the 8x8 images with dropout: each linear layer is one FSDP2 unit."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 48), nn.Linear(48, 48), nn.Linear(48, CLASSES)])
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = self.dropout(torch.relu(layer(h)))
        out: torch.Tensor = self.layers[-1](h)
        return out


def shard(model: Net) -> Net:
    """FSDP2: every linear layer, then the root (its own parameters: none; it groups the rest)."""
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def digest(model: nn.Module) -> tuple[str, bool]:
    """sha256 of the full parameters (gathered to rank 0; '' elsewhere), and whether all are finite."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return "", True
    return state_digest(full)


def main() -> int:  # noqa: C901 - a training loop, read top to bottom
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--ckpt-dir", type=Path)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    init_process_group("gloo")
    rank = dist.get_rank()
    reporter = Reporter.from_env()
    guard = PlannedInterrupt((signal.SIGTERM, signal.SIGUSR1), reporter=reporter).install()

    inputs = np.load(args.data / "inputs.npy", mmap_mode="r")
    labels = np.load(args.data / "labels.npy", mmap_mode="r")
    torch.manual_seed(args.seed)  # the same initial weights on every rank, before sharding
    model = shard(Net())
    torch.manual_seed(args.seed + 1 + rank)  # per-rank dropout streams
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    clipper = AdaptiveClipper(model.parameters(), ClipSettings())
    state = {"train": ModelOptimizerState(model, optimizer)}

    start = 0
    manager = None
    if args.ckpt_dir is not None:
        manager = CheckpointManager(args.ckpt_dir, keep_last=3, reporter=reporter)
        resume = manager.load_latest(state)
        if resume is not None:
            start = int(resume.data_position["next_batch"])
            clipper.load_state_dict(resume.local["clipper"])
            guard.load_state_dict(resume.local["interrupt"])
            if rank == 0:
                say(f"RESUMED {resume.step}")
    control = reporter.poll_control()
    if control.clip is not None:
        clipper.update(control.clip)
    reporter.clip_in_use(clipper.settings)

    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, args.steps):
        if control.should_skip(step):
            if rank == 0:
                say(f"SKIP {step}")
            continue
        x = torch.from_numpy(np.array(inputs[step, rank]))
        y = torch.from_numpy(np.array(labels[step, rank]))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        grad_norm = clipper.clip()  # the global norm across both ranks' shards
        clipper.step(optimizer)
        reporter.step(step, loss=loss.detach(), grad_norm=grad_norm, lr=args.lr)
        if rank == 0:
            say(f"STEP {step} {float(loss.detach()):.6f}")
        boundary = guard.at_boundary(step)
        if boundary.clip is not None:
            clipper.update(boundary.clip)
            reporter.clip_in_use(clipper.settings)
        periodic = (step + 1) % args.ckpt_every == 0
        if manager is not None and (periodic or boundary.checkpoint):
            saved = manager.save(
                step,
                state,
                data_position={"next_batch": step + 1},
                local={"clipper": clipper.state_dict(), "interrupt": guard.state_dict()},
            )
            if saved is not None and rank == 0 and boundary.checkpoint:
                say(f"SAVED {step}")
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
