r"""FSDP2 checks run on real gloo ranks (under torchrun) for tests/test_fsdp.py; one JSON file per rank.

    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_checks.py clip accumulate --out DIR
    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_checks.py save --ckpt DIR --out DIR
    python -m torch.distributed.run --nproc-per-node 1 tests/fsdp_checks.py load --ckpt DIR --out DIR

``clip``: the same model twice, once sharded with `fully_shard` and once whole on every rank, fed
the same global batches (the sharded one gets this rank's half): per step the sharded clipper's
norm, the unsharded clipper's norm, both skip flags, and the number of collectives `clip()` issued.
``accumulate``: the norm after two micro-batches with gradient sync only on the second, against
the whole model's norm on the full batch. ``layouts``: `grad_norm.total_norm` of DTensors on
other placements (the fallback through DTensor's own norm) beside a plain tensor. ``save``
trains a few steps and saves through `CheckpointManager`, writing the full parameters and
optimizer state it saved; ``load`` (on any world size) loads the newest checkpoint and writes
what it got.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from trainwarden.client import grad_norm
from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.distributed import init_process_group
from trainwarden.control import ClipSettings

SETTINGS = ClipSettings(warmup_steps=5, z_threshold=2.5, skip_z_threshold=10.0, ema_alpha=0.9)
SPIKES = {9: 300.0, 14: 3.0}  # step -> target scale: an outlier to skip, a spike to clip
BATCH = 16


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))


def sharded(model: nn.Sequential) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 8, generator=gen)
    return x, torch.randn(BATCH, 3, generator=gen) * SPIKES.get(step, 1.0)


def half(t: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of the global batch."""
    size = t.shape[0] // dist.get_world_size()
    return t[dist.get_rank() * size : (dist.get_rank() + 1) * size]


def clip_check() -> dict[str, Any]:
    whole = net()
    shards = sharded(copy.deepcopy(whole))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (shards, whole)]
    clippers = [AdaptiveClipper(m.parameters(), SETTINGS) for m in (shards, whole)]
    steps: list[dict[str, Any]] = []
    for step in range(20):
        x, y = batch(step)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(shards(half(x)), half(y)).backward()  # FSDP2 averages over ranks
        nn.functional.mse_loss(whole(x), y).backward()
        with CommDebugMode() as comms:
            norm = clippers[0].clip()
        whole_norm = clippers[1].clip()
        for clipper, opt in zip(clippers, opts, strict=True):
            clipper.step(opt)
        flags = [c.skip_flag for c in clippers]
        steps.append(
            {
                "norm": float(norm),
                "whole_norm": float(whole_norm),
                "skip": float(flags[0]) if flags[0] is not None else -1.0,
                "whole_skip": float(flags[1]) if flags[1] is not None else -1.0,
                "collectives": comms.get_total_counts(),
                "kinds": sorted(str(k) for k in comms.get_comm_counts()),
            }
        )
    full, _ = get_state_dict(shards, [], options=StateDictOptions(full_state_dict=True))
    final_gap = max(float((full[name] - tensor).abs().max()) for name, tensor in whole.state_dict().items())
    stats = [c.stats() for c in clippers]
    return {
        "steps": steps,
        "counts": [[s.clipped_steps, s.skipped_steps] for s in stats],
        "final_param_gap": final_gap,
    }


def accumulate_check() -> dict[str, Any]:
    whole = net()
    shards = sharded(copy.deepcopy(whole))
    clipper = AdaptiveClipper(shards.parameters(), SETTINGS)
    x, y = batch(0)
    micro = [(x[:8], y[:8]), (x[8:], y[8:])]
    for i, (mx, my) in enumerate(micro):
        shards.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter on the last one only
        (nn.functional.mse_loss(shards(half(mx)), half(my)) / len(micro)).backward()
    nn.functional.mse_loss(whole(x), y).backward()
    return {
        "norm": float(clipper.clip()),
        "whole_norm": float(torch.nn.utils.get_total_norm([p.grad for p in whole.parameters()])),
    }


def layouts_check() -> dict[str, Any]:
    """The global norm of DTensors sharded on either dim, replicated, and a plain tensor beside them."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(3)
    whole = [torch.randn(6, 5), torch.randn(4, 7), torch.randn(3), torch.randn(2, 2)]
    placements = [Shard(0), Shard(1), Replicate()]
    grads = [distribute_tensor(t, mesh, [p]) for t, p in zip(whole, placements, strict=False)]
    norm = grad_norm.total_norm([*grads, whole[3]])
    return {
        "norm": float(norm),
        "want": float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in whole]))),
    }


def train_and_save(ckpt: Path) -> dict[str, Any]:
    model = sharded(net())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"train": ModelOptimizerState(model, opt)}
    manager = CheckpointManager(ckpt, keep_last=2)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(half(x)), half(y)).backward()
        opt.step()
    manager.save(3, state, data_position={"next_batch": 4})
    manager.close()
    return full_state(model, opt)


def load(ckpt: Path) -> dict[str, Any]:
    model = sharded(net())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"train": ModelOptimizerState(model, opt)}
    resume = CheckpointManager(ckpt, keep_last=2).load_latest(state, restore_rng=False)
    return {"step": None if resume is None else resume.step, **full_state(model, opt)}


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (unsharded) parameters and Adam moments as lists, comparable across world sizes."""
    model_sd, optim_sd = get_state_dict(model, [opt], options=StateDictOptions(full_state_dict=True))
    moments = {
        f"{name}.{key}": value.flatten().tolist()
        for name, per_param in optim_sd["state"].items()
        for key, value in per_param.items()
        if key in {"exp_avg", "exp_avg_sq"}
    }
    return {"params": {k: v.flatten().tolist() for k, v in model_sd.items()}, "moments": moments}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checks", nargs="+", choices=["clip", "accumulate", "layouts", "save", "load"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_process_group("gloo")
    runs = {
        "clip": clip_check,
        "accumulate": accumulate_check,
        "layouts": layouts_check,
        "save": lambda: train_and_save(args.ckpt),
        "load": lambda: load(args.ckpt),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for check in args.checks:
        text = json.dumps(runs[check](), allow_nan=True)
        (args.out / f"{check}.rank{dist.get_rank()}.json").write_text(text, encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
