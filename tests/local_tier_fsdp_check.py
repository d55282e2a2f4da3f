"""Two FSDP2 ranks (DTensor shards) save to the local tier only, then a fresh sharded model loads it.

Prints `RANK r step tier equal` per rank: `equal` says whether the full parameters loaded equal
those saved. Run under torchrun with two ranks; argv[1] is a scratch directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fsdp_trainer import Net, shard
from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState


def main() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, root = dist.get_rank(), Path(sys.argv[1])
    torch.manual_seed(0)
    model = shard(Net())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 64)

    def train() -> None:
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()

    train()
    tiers: dict[str, Any] = {"durable_every": 100, "local_dir": root / f"node{rank}", "local_every": 1}
    manager = CheckpointManager(root / "durable", **tiers)
    manager.save(0, {"train": ModelOptimizerState(model, opt)})
    manager.close()
    saved = [p.full_tensor().clone() for p in model.parameters()]
    train()  # move on, so a load that did nothing would show
    torch.manual_seed(5)
    fresh = shard(Net())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    loader = CheckpointManager(root / "durable", **tiers)
    resume = loader.load_latest({"train": ModelOptimizerState(fresh, fresh_opt)})
    equal = all(torch.equal(a, b.full_tensor()) for a, b in zip(saved, fresh.parameters(), strict=True))
    where = "none none" if resume is None else f"{resume.step} {resume.tier}"
    sys.stdout.write(f"RANK {rank} {where} {equal}\n")
    sys.stdout.flush()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
