"""Cost of `AdaptiveClipper.clip()` against `torch.nn.utils.clip_grad_norm_` on the same gradients.

A ~250 k-parameter causal transformer LM (2 layers, width 96, vocabulary 256) computes one batch's
gradients once; the clipper is warmed up on 30 steps of them scaled by 0.85-1.15, and its state
kept. Each timed call starts from a copy of the gradients scaled by the step kind's factor and
(for the clipper) from that same state, both outside the timing: 1.0 (healthy: left alone), 1.8
(a spike: clipped), 60 (an outlier: skipped). The two callers alternate call by call, so a change
of the machine's load hits both alike.

- **replicated**: one process, plain tensors (what DDP hands the clipper);
- **device path**: the same, with the clipper forced onto its device path (0-d tensors, what runs on
  an accelerator, where a host read would be a sync), timed on CPU for reference;
- **sharded**: 2 gloo ranks on CPU, the LM under FSDP2 `fully_shard`, DTensor gradients
  (`clip_grad_norm_` then goes through DTensor's dispatch; the clipper reduces one scalar).

For each: median µs per call by step kind, the ratio clipper / `clip_grad_norm_`, and the
clipper's decision for each kind, which must be the same in every row. Run::

    .venv/bin/python bench/clipper.py              # prints Markdown tables
    .venv/bin/python bench/clipper.py --rounds 100

Target (issue 13): <= 1.1x `clip_grad_norm_`, replicated and sharded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainwarden.client import clipping
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.control import ClipSettings

VOCAB, SEQ, BATCH, DIM, HEADS, LAYERS, FF = 256, 32, 8, 96, 4, 2, 320
SETTINGS = ClipSettings(warmup_steps=10)  # defaults otherwise: z 2.5 clips, z 10 skips
KINDS = {"healthy": 1.0, "clipped": 1.8, "skipped": 60.0}  # step kind -> gradient scale


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(self.embed(tokens) + self.pos[: tokens.shape[1]]))
        return out


def warm_up(clipper: AdaptiveClipper, params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    """30 healthy steps whose norms vary by +-15 %, so the clipper has a spread to judge against."""
    for i in range(30):
        set_grads(params, saved, 1.0 + 0.15 * ((i * 7919) % 13 - 6) / 6)
        clipper.clip()


def set_grads(params: list[nn.Parameter], saved: list[torch.Tensor], factor: float) -> None:
    for p, g in zip(params, saved, strict=True):
        assert p.grad is not None
        p.grad.copy_(g)
        p.grad.mul_(factor)


def decision(before: Any, after: Any) -> str:
    if after.skipped_steps > before.skipped_steps:
        return "skipped"
    return "clipped" if after.clipped_steps > before.clipped_steps else "untouched"


def measure(model: nn.Module, rounds: int) -> dict[str, Any]:
    """Time clip_grad_norm_ and clip() call by call, each kind of step from the same clipper state."""
    torch.manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    model(tokens).logsumexp(-1).mean().backward()
    saved = [p.grad.detach().clone() for p in params if p.grad is not None]
    clipper = AdaptiveClipper(params, SETTINGS)
    warm_up(clipper, params, saved)
    snapshot = clipper.state_dict()
    callers: dict[str, Callable[[], object]] = {
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "clip()": clipper.clip,
    }
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in KINDS} for name in callers}
    decisions: dict[str, set[str]] = {k: set() for k in KINDS}
    for _ in range(rounds):
        for kind, factor in KINDS.items():
            for name, call in callers.items():
                set_grads(params, saved, factor)
                clipper.load_state_dict(snapshot)  # every call of a kind starts from the same state
                before = clipper.stats()
                t0 = time.perf_counter()
                call()
                times[name][kind].append(time.perf_counter() - t0)
                if name == "clip()":
                    decisions[kind].add(decision(before, clipper.stats()))
    return {
        "params": sum(p.numel() for p in params),
        "us": {name: {k: statistics.median(v) * 1e6 for k, v in per.items()} for name, per in times.items()},
        "decisions": {k: sorted(v) for k, v in decisions.items()},
    }


def sharded_worker(rank: int, world: int, port: int, rounds: int, out: str) -> None:
    """One gloo rank: the LM under fully_shard, timings written by rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415 - only the sharded run needs it

    torch.manual_seed(0)
    model = TinyLM()
    for block in model.blocks.layers:
        fully_shard(block)
    fully_shard(model)
    result = measure(model, rounds)
    if rank == 0:
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


def sharded(rounds: int) -> dict[str, Any]:
    import torch.multiprocessing as mp  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support import free_port  # noqa: PLC0415 - the tests' helper picks a free loopback port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "sharded.json")
        mp.start_processes(sharded_worker, args=(2, free_port(), rounds, out), nprocs=2, start_method="spawn")
        result: dict[str, Any] = json.loads(Path(out).read_text(encoding="utf-8"))
    return result


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| gradients | step | clip_grad_norm_ µs | clip() µs | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for label, r in rows.items():
        for kind in KINDS:
            base, ours = r["us"]["clip_grad_norm_"][kind], r["us"]["clip()"][kind]
            lines.append(f"| {label} | {kind} | {base:.0f} | {ours:.0f} | {ours / base:.2f}x |")
    lines += ["", "| gradients | parameters | decision per kind (every call) |", "|---|---:|---|"]
    for label, r in rows.items():
        said = ", ".join(f"{kind}: {'/'.join(r['decisions'][kind])}" for kind in KINDS)
        lines.append(f"| {label} | {r['params']} | {said} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed calls per step kind and caller")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, dict[str, Any]] = {}
    torch.manual_seed(0)
    rows["replicated"] = measure(TinyLM(), args.rounds)
    host_side = clipping._host_side  # noqa: SLF001 - the bench times the device path on purpose
    clipping._host_side = lambda _device: False  # type: ignore[assignment]  # noqa: SLF001
    try:
        torch.manual_seed(0)
        rows["device path (on CPU)"] = measure(TinyLM(), args.rounds)
    finally:
        clipping._host_side = host_side  # noqa: SLF001
    rows["sharded (FSDP2, 2 ranks)"] = sharded(args.rounds)
    print(table(rows))


if __name__ == "__main__":
    main()
