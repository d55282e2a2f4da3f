"""Loss spikes from bad batches: no clipping vs fixed clipping at 1.0 vs the adaptive (ZClip) clipper.

A small causal transformer LM learns a synthetic language (a sparse random Markov chain) on CPU
with an aggressive AdamW learning rate. At fixed steps a bad batch is injected: every sequence is
one repeated token. Each (clipping, scale) pair is run twice on identical data, with and without
the bad batches, so the damage of a bad batch is measured paired:

- damage: extra training loss summed over the 20 steps after each bad batch (bad run minus clean
  run on the same batches), averaged over the bad batches;
- spike events: later steps whose loss exceeds 1.5x the median of the previous 20 clean steps;
- final loss: mean loss over the last 20 steps (clean run and bad run);
- clipped: share of steps on which the clipper scaled the gradients (clean run);
- clip cost: median time of the clipping call (norm + scaling) per step, and its share of a step.

`--loss-scale 0.01` scales the loss down so the healthy grad norm sits far below 1.0, as in large
LLMs, where clipping at 1.0 never acts. Run::

    .venv/bin/python bench/spikes.py                # both scales, prints a Markdown table
    .venv/bin/python bench/spikes.py --json out.json

Targets (issue 3): adaptive damage <= 0.15x fixed clipping's, clipping active on < 10 % of steps,
clean final loss within 5 % of fixed clipping's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.control import ClipSettings

VOCAB, SEQ, BATCH, DIM, HEADS, LAYERS = 64, 32, 16, 64, 4, 2
AFTER = 20


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(
            DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def make_batches(steps: int, seed: int) -> list[torch.Tensor]:
    """Sequences from a random sparse Markov chain (4 likely successors per token)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.full((VOCAB, VOCAB), -8.0)
    for tok in range(VOCAB):
        succ = torch.randperm(VOCAB, generator=gen)[:4]
        logits[tok, succ] = torch.randn(4, generator=gen)
    probs = logits.softmax(-1)
    batches = []
    for _ in range(steps):
        seq = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(VOCAB, (BATCH,), generator=gen)
        for t in range(SEQ):
            seq[:, t + 1] = torch.multinomial(probs[seq[:, t]], 1, generator=gen).squeeze(1)
        batches.append(seq)
    return batches


def bad_batch(step: int) -> torch.Tensor:
    """Every sequence one repeated token (a classic data-pipeline failure)."""
    return torch.full((BATCH, SEQ + 1), step % VOCAB, dtype=torch.long)


@dataclass
class Run:
    losses: list[float]
    clipped: int
    clipped_after_warmup: int
    clip_seconds: list[float]
    step_seconds: list[float]
    norms: list[float]


def train(mode: str, batches: list[torch.Tensor], bad_steps: set[int], args: argparse.Namespace) -> Run:
    torch.manual_seed(args.seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = (
        AdaptiveClipper(
            params, ClipSettings(warmup_steps=args.warmup, warmup_max_norm=1.0), mode="reciprocal"
        )
        if mode == "adaptive"
        else None
    )
    loss_fn = nn.CrossEntropyLoss()
    run = Run([], 0, 0, [], [], [])
    at_warmup = 0
    for step, clean in enumerate(batches):
        seq = bad_batch(step) if step in bad_steps else clean
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(seq[:, :-1])
        loss = loss_fn(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        (loss * args.loss_scale).backward()
        c0 = time.perf_counter()
        if mode == "fixed":
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            run.clipped += int(norm.item() > 1.0)
            if step >= args.warmup:
                run.clipped_after_warmup += int(norm.item() > 1.0)
        elif clipper is not None:
            if step == args.warmup:
                at_warmup = clipper.stats().clipped_steps
            norm = clipper.clip()
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        run.clip_seconds.append(time.perf_counter() - c0)
        opt.step()
        run.step_seconds.append(time.perf_counter() - t0)
        run.losses.append(float(loss.item()))
        run.norms.append(float(norm.item()))
    if clipper is not None:
        run.clipped = clipper.stats().clipped_steps
        run.clipped_after_warmup = run.clipped - at_warmup
    return run


def spike_events(losses: list[float], bad_steps: set[int]) -> int:
    events = 0
    for i in range(20, len(losses)):
        if i in bad_steps:
            continue
        window = [losses[j] for j in range(i - 20, i) if j not in bad_steps]
        if window and losses[i] > 1.5 * statistics.median(window):
            events += 1
    return events


def measure(mode: str, scale: float, seed: int, args: argparse.Namespace) -> dict[str, float | str]:
    args.loss_scale = scale
    args.seed = seed
    batches = make_batches(args.steps, seed)
    bad_steps = set(range(args.first_bad, args.steps - AFTER, args.bad_every))
    clean = train(mode, batches, set(), args)
    bad = train(mode, batches, bad_steps, args)
    damages = [
        sum(bad.losses[t + k] - clean.losses[t + k] for k in range(1, AFTER + 1)) for t in sorted(bad_steps)
    ]
    tail = slice(-20, None)
    return {
        "mode": mode,
        "loss_scale": scale,
        "seed": seed,
        "bad_batches": len(bad_steps),
        "damage": statistics.mean(damages),
        "spike_events": spike_events(bad.losses, bad_steps),
        "final_loss_clean": statistics.mean(clean.losses[tail]),
        "final_loss_bad": statistics.mean(bad.losses[tail]),
        "clipped_share_clean": clean.clipped / len(batches),
        "clipped_share_bad": bad.clipped / len(batches),
        "clipped_share_clean_after_warmup": clean.clipped_after_warmup / (len(batches) - args.warmup),
        "healthy_norm_median": statistics.median(clean.norms[args.warmup :]),
        "clip_us_p50": statistics.median(clean.clip_seconds) * 1e6,
        "clip_share_of_step": statistics.median(clean.clip_seconds) / statistics.median(clean.step_seconds),
    }


def table(rows: list[dict[str, float | str]]) -> str:
    head = (
        "| loss scale | seed | clipping | damage (Σ extra loss, 20 steps) | spike events "
        "| final loss clean / bad | clipped (clean / bad / clean after warm-up) "
        "| healthy norm | clip µs/step (share) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        share = 100 * float(r["clip_share_of_step"])
        lines.append(
            f"| {r['loss_scale']} | {r['seed']} | {r['mode']} | {r['damage']:.3f} | {r['spike_events']} "
            f"| {r['final_loss_clean']:.4f} / {r['final_loss_bad']:.4f} "
            f"| {100 * float(r['clipped_share_clean']):.1f} / {100 * float(r['clipped_share_bad']):.1f} / "
            f"{100 * float(r['clipped_share_clean_after_warmup']):.1f} % "
            f"| {r['healthy_norm_median']:.3g} | {r['clip_us_p50']:.0f} ({share:.1f} %) |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict[str, float | str]]) -> str:
    out = []
    for scale in sorted({float(r["loss_scale"]) for r in rows}, reverse=True):

        def mean(mode: str, key: str, scale: float = scale) -> float:
            return statistics.mean(
                float(r[key]) for r in rows if r["mode"] == mode and r["loss_scale"] == scale
            )

        seeds = sorted({int(r["seed"]) for r in rows})
        per_seed = []
        for seed in seeds:
            by = {r["mode"]: r for r in rows if r["loss_scale"] == scale and r["seed"] == seed}
            fixed_damage = float(by["fixed"]["damage"])
            per_seed.append(float(by["adaptive"]["damage"]) / fixed_damage if fixed_damage > 0 else math.nan)
        ratio = mean("adaptive", "damage") / mean("fixed", "damage")
        final = mean("adaptive", "final_loss_clean") / mean("fixed", "final_loss_clean") - 1
        out.append(
            f"- loss scale {scale}: adaptive/fixed damage = {ratio:.3f} over {len(seeds)} seed(s) "
            f"(per seed {', '.join(f'{r:.2f}' for r in per_seed)}; target <= 0.15); adaptive clipped on "
            f"{100 * mean('adaptive', 'clipped_share_clean'):.1f} % of clean steps, "
            f"{100 * mean('adaptive', 'clipped_share_clean_after_warmup'):.1f} % after warm-up "
            "(target < 10 %); "
            f"clean final loss {100 * final:+.2f} % vs fixed (target within 5 %)"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--first-bad", type=int, default=80)
    p.add_argument("--bad-every", type=int, default=50)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.01])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = [
        measure(mode, scale, seed, args)
        for scale in args.scales
        for seed in args.seeds
        for mode in ("none", "fixed", "adaptive")
    ]
    print(table(rows))
    print()
    print(verdict(rows))
    print(
        f"\n{args.steps} steps x {2 * len(rows)} runs in {time.perf_counter() - started:.0f} s,"
        f" torch {torch.__version__}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
