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
  (`clip_grad_norm_` then goes through DTensor's dispatch; the clipper reduces one scalar), on
  the host path and forced onto the device path.

For each: median µs per call by step kind, the ratio clipper / `clip_grad_norm_`, and the
clipper's decision for each kind, which must be the same in every row. Then, for the replicated
gradients, the ops each call dispatches (counted with a `TorchDispatchMode`, so independent of
the machine): on an accelerator each op that is not a view is a kernel launch of some 5-10 µs of
host time, so on the device path the count is what predicts the ratio there. Run::

    .venv/bin/python bench/clipper.py              # prints Markdown tables
    .venv/bin/python bench/clipper.py --rounds 100
    .venv/bin/python bench/clipper.py --device cuda   # on a GPU: its device path, end to end

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
from torch.utils._python_dispatch import TorchDispatchMode

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


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, and how many of them are views (no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


def count(call: Callable[[], object]) -> list[int]:
    """[ops, views] that one call dispatches."""
    with OpCount() as mode:
        call()
    return [mode.ops, mode.views]


def warmup_counts(params: list[nn.Parameter], saved: list[torch.Tensor]) -> dict[str, list[int]]:
    """Ops of a fresh clipper's first call, of a warm-up step, and of the last one (statistics start)."""
    clipper = AdaptiveClipper(params, SETTINGS)
    counts = {}
    for step in range(SETTINGS.warmup_steps):
        set_grads(params, saved, 1.0)
        ops = count(clipper.clip)
        if step in (0, 1, SETTINGS.warmup_steps - 1):
            counts[{0: "first call", 1: "warm-up"}.get(step, "warm-up end")] = ops
    return counts


def measure(model: nn.Module, rounds: int, device: str = "cpu") -> dict[str, Any]:
    """Time clip_grad_norm_ and clip() call by call, each kind of step from the same clipper state."""
    torch.manual_seed(1)
    model.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
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
                sync()
                t0 = time.perf_counter()
                call()
                sync()  # on a GPU: launch and run, end to end
                times[name][kind].append(time.perf_counter() - t0)
                if name == "clip()":
                    decisions[kind].add(decision(before, clipper.stats()))
    ops: dict[str, dict[str, list[int]]] = {name: {} for name in callers}
    for kind, factor in KINDS.items():
        for name, call in callers.items():
            set_grads(params, saved, factor)
            clipper.load_state_dict(snapshot)
            ops[name][kind] = count(call)
    ops["clip()"].update(warmup_counts(params, saved))
    return {
        "ops": ops,
        "params": sum(p.numel() for p in params),
        "us": {name: {k: statistics.median(v) * 1e6 for k, v in per.items()} for name, per in times.items()},
        "decisions": {k: sorted(v) for k, v in decisions.items()},
    }


def sharded_worker(rank: int, world: int, port: int, rounds: int, out: str, device_path: bool) -> None:
    """One gloo rank: the LM under fully_shard, timings written by rank 0."""
    if device_path:
        clipping._host_side = lambda _device: False  # type: ignore[assignment]  # noqa: SLF001
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


def sharded(rounds: int, device_path: bool) -> dict[str, Any]:
    import torch.multiprocessing as mp  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support import free_port  # noqa: PLC0415 - the tests' helper picks a free loopback port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "sharded.json")
        mp.start_processes(
            sharded_worker, args=(2, free_port(), rounds, out, device_path), nprocs=2, start_method="spawn"
        )
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


def ops_table(rows: dict[str, dict[str, Any]]) -> str:
    """Ops per call (views in brackets: dispatched, but no kernel) and the ratio of kernels."""
    lines = [
        "| gradients | step | clip_grad_norm_ ops | clip() ops (views) | kernel ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for label, r in rows.items():
        base = r["ops"]["clip_grad_norm_"]["healthy"]
        for kind, (ops, views) in r["ops"]["clip()"].items():
            theirs = r["ops"]["clip_grad_norm_"].get(kind, base)
            ratio = (ops - views) / (theirs[0] - theirs[1])
            lines.append(f"| {label} | {kind} | {theirs[0]} | {ops} ({views}) | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed calls per step kind and caller")
    parser.add_argument("--device", default="cpu", help="e.g. cuda: time the device path where it runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, dict[str, Any]] = {}
    if args.device != "cpu":
        torch.manual_seed(0)
        rows[args.device] = measure(TinyLM(), args.rounds, args.device)  # cuda: the device path
        print(table(rows), ops_table(rows), sep="\n\n")
        return
    torch.manual_seed(0)
    rows["replicated"] = measure(TinyLM(), args.rounds)
    host_side = clipping._host_side  # noqa: SLF001 - the bench times the device path on purpose
    clipping._host_side = lambda _device: False  # type: ignore[assignment]  # noqa: SLF001
    try:
        torch.manual_seed(0)
        rows["device path (on CPU)"] = measure(TinyLM(), args.rounds)
    finally:
        clipping._host_side = host_side  # noqa: SLF001
    rows["sharded (FSDP2, 2 ranks)"] = sharded(args.rounds, device_path=False)
    rows["sharded, device path (on CPU)"] = sharded(args.rounds, device_path=True)
    print(table(rows))
    print()
    print(ops_table({k: v for k, v in rows.items() if not k.startswith("sharded")}))


if __name__ == "__main__":
    main()
