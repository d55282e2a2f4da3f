"""A 2-rank gloo/DDP trainer that checkpoints through both tiers with the documented API only.

`CheckpointManager(durable, local_dir=…, local_every=…, durable_every=…)` and one `save()` per step
boundary. Deterministic (data seeded by step and rank, AdamW state in the checkpoint), so a
resumed run ends bit-identical to an uninterrupted one. Each rank gets its own ``--local-root``
subdirectory ``node<rank>``, as if every rank sat on a node of its own.

Lines on stdout (one write each): `RESUMED step tier rank`, `STEP n` (rank 0), `FINAL sha256`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer_output import say
from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.distributed import init_process_group


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--durable", type=Path, required=True)
    p.add_argument("--local-root", type=Path, default=None)
    p.add_argument("--local-every", type=int, default=2)
    p.add_argument("--durable-every", type=int, default=10)
    p.add_argument("--crash-at", type=int, default=-1, help="every rank exits with 1 at this step")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--local-when-busy", choices=("skip", "wait"), default="skip")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    local_dir = None if args.local_root is None else args.local_root / f"node{rank}"
    manager = CheckpointManager(
        args.durable,
        keep_last=2,
        durable_every=args.durable_every,
        local_dir=local_dir,
        local_every=args.local_every,
        local_when_busy=args.local_when_busy,
    )
    state = {"train": ModelOptimizerState(model, optimizer)}
    start = 0
    resume = manager.load_latest(state)
    if resume is not None:
        start = resume.step + 1
        say(f"RESUMED {resume.step} {resume.tier} {rank}")
    for step in range(start, args.steps):
        if step == args.crash_at:
            os._exit(1)  # no wait for the writer thread: a local save may be lost mid-write
        data = torch.Generator().manual_seed(step * world + rank)
        x = torch.randn(16, 8, generator=data)
        optimizer.zero_grad()
        loss = ((ddp(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        loss.backward()
        optimizer.step()
        manager.save(step, state, data_position={"next": step + 1})
        if rank == 0:
            say(f"STEP {step}")
        time.sleep(args.step_sleep)
    manager.close()
    if rank == 0 and args.out is not None:
        digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
        args.out.write_text(digest.hexdigest() + "\n", encoding="utf-8")
        say(f"FINAL {digest.hexdigest()}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
