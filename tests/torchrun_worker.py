"""A worker for torchrun that uses only the documented client API: the attempt-keyed process group
(`trainwarden.client.distributed.init_process_group`), `Reporter`, `PlannedInterrupt` and
`CheckpointManager`. Deterministic, so a resumed run ends bit-identical to an uninterrupted one.

Lines on stdout (one write each): `STEP n` (rank 0), `RESUMED n`, `STOPPED n reason`, `SETUP_HANG`,
`FINAL sha256`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainwarden.client.checkpoint import CheckpointManager
from trainwarden.client.distributed import init_process_group
from trainwarden.client.interrupt import PlannedInterrupt
from trainwarden.client.reporter import Reporter


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--job", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--hang-in-setup-after-restart", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reporter = Reporter.from_env(job=args.job)
    if args.hang_in_setup_after_restart and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        say(f"SETUP_HANG {rank}")
        time.sleep(3600)
    model = nn.Linear(8, 1)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # stateless: the model is the whole state
    guard = PlannedInterrupt((signal.SIGTERM,), reporter=reporter).install()
    manager = CheckpointManager(args.ckpt_dir, reporter=reporter)
    state = {"model": model}
    start = 0
    resume = manager.load_latest(state)
    if resume is not None:
        start = resume.step + 1
        guard.load_state_dict(resume.local.get("interrupt", {}))
        say(f"RESUMED {resume.step}")
    for step in range(start, args.steps):
        data = torch.Generator().manual_seed(step * world + rank)
        x = torch.randn(16, 8, generator=data)
        y = x.sum(dim=1, keepdim=True)
        optimizer.zero_grad()
        loss = ((ddp(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        reporter.step(step, loss=loss.detach())
        if rank == 0:
            say(f"STEP {step}")
        boundary = guard.at_boundary(step)
        if boundary.checkpoint or (step + 1) % args.ckpt_every == 0:
            manager.save(step, state, local={"interrupt": guard.state_dict()})
        if boundary.stop:
            manager.wait()
            say(f"STOPPED {step} {boundary.reason}")
            reporter.close()
            guard.exit()
        time.sleep(args.step_sleep)
    manager.close()
    if rank == 0 and args.out is not None:
        digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
        args.out.write_text(digest.hexdigest() + "\n", encoding="utf-8")
        say(f"FINAL {digest.hexdigest()}")
    reporter.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
