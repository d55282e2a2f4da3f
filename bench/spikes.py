"""Loss spikes from bad batches: no clipping vs fixed clipping at 1.0 vs the adaptive clipper.

A small causal transformer LM learns a synthetic language (a sparse random Markov chain) on CPU
with an aggressive AdamW learning rate. At fixed steps a bad batch is injected: every sequence is
one repeated token. Each (clipping, scale) pair is run twice on identical data, with and without
the bad batches, so the damage of a bad batch is measured paired:

- damage: extra training loss summed over the 20 steps after each bad batch (bad run minus clean
  run on the same batches), averaged over the bad batches;
- spike events: bad batches after which the daemon's `spike` rule, with its default options,
  flags the loss within 20 steps (robust z of log-loss > 6 against the median/MAD of up to 200
  earlier steps, bad batches themselves left out); in the clean run, the steps it flags at all
  (false alarms);
- final loss: mean loss over the last 20 steps (clean run and bad run);
- clipped / skipped: share of steps on which the clipper scaled the gradients / zeroed them;
- z: the largest z-score the adaptive clipper saw on a clean step after warm-up, and the smallest
  it saw on a bad batch (how far either side of the skip threshold, 10, they stay);
- clip cost: median time of the clipping call (norm + scaling) per step, and its share of a step.

Every run uses ``AdamW(fused=True)``. Clippers: ``none``; ``fixed`` = ``clip_grad_norm_(1.0)``;
``zclip`` = `AdaptiveClipper` with skipping off (``skip_z_threshold=inf``, ZClip alone);
``adaptive`` = `AdaptiveClipper` with its default settings and ``clipper.step(optimizer)``, so an
extreme outlier's step is skipped on the device (zeroed gradients + the fused optimizer's
``found_inf``); ``adaptive-zero`` = the same clipper with a plain ``optimizer.step()``, i.e. what
an optimizer without ``found_inf`` support gets: zeroed gradients, which still take one step
along AdamW's momentum; ``oracle-skip`` (not run by default) = no clipping, and the host, which
knows the bad steps, does not call ``optimizer.step()`` on them.

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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.control import ClipSettings
from trainwarden.rules.base import robust_scale
from trainwarden.rules.spike import SpikeOptions

VOCAB, SEQ, BATCH, DIM, HEADS, LAYERS = 64, 32, 16, 64, 4, 2
AFTER = 20
MODES = ("none", "fixed", "zclip", "adaptive-zero", "adaptive", "oracle-skip")
CLIPPERS = {"zclip", "adaptive-zero", "adaptive"}


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
        out: torch.Tensor = self.head(self.blocks(h, mask=self.mask, is_causal=True))
        return out


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
    skipped: int = 0
    clean_max_z: float = math.nan
    bad_min_z: float = math.nan


def train(mode: str, batches: list[torch.Tensor], bad_steps: set[int], args: argparse.Namespace) -> Run:
    torch.manual_seed(args.seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95), fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = None
    if mode in CLIPPERS:
        settings = ClipSettings(warmup_steps=args.warmup, warmup_max_norm=1.0)
        if mode == "zclip":
            settings = replace(settings, skip_z_threshold=math.inf)
        clipper = AdaptiveClipper(params, settings, mode="reciprocal")
    loss_fn = nn.CrossEntropyLoss()
    run = Run([], 0, 0, [], [], [])
    at_warmup = 0
    clean_z: list[float] = []
    bad_z: list[float] = []
    for step, clean in enumerate(batches):
        before = clipper.stats() if clipper is not None and step >= args.warmup else None
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
        if mode == "adaptive" and clipper is not None:
            clipper.step(opt)
        elif not (mode == "oracle-skip" and step in bad_steps):
            opt.step()
        run.step_seconds.append(time.perf_counter() - t0)
        run.losses.append(float(loss.item()))
        run.norms.append(float(norm.item()))
        if before is not None:  # outside the timed part: this syncs
            z = (run.norms[-1] - before.mean) / max(before.std, 1e-6)
            (bad_z if step in bad_steps else clean_z).append(z)
    if clipper is not None:
        stats = clipper.stats()
        run.clipped = stats.clipped_steps
        run.clipped_after_warmup = run.clipped - at_warmup
        run.skipped = stats.skipped_steps
        run.clean_max_z = max(clean_z)
        run.bad_min_z = min(bad_z, default=math.nan)
    return run


def spike_steps(losses: list[float], bad_steps: set[int]) -> set[int]:
    """Steps (bad batches left out) the daemon's spike rule would flag on log-loss (default options)."""
    opts = SpikeOptions()
    logs = [math.log(v) if v > 0 and math.isfinite(v) else math.nan for v in losses]
    flagged = set()
    for i in range(len(losses)):
        if i in bad_steps:
            continue
        baseline = [v for j, v in enumerate(logs[:i]) if j not in bad_steps and math.isfinite(v)]
        baseline = baseline[-opts.baseline_points :]
        if len(baseline) < opts.min_baseline_points:
            continue
        center, scale = robust_scale(baseline, opts.min_scale_ratio)
        # a NaN loss is a fault the nonfinite rule reports; count it here too, it is what we avoid
        if not math.isfinite(logs[i]) or (logs[i] - center) / scale > opts.z_threshold:
            flagged.add(i)
    return flagged


def measure(
    mode: str, scale: float, seed: int, args: argparse.Namespace, cache: dict[tuple[float, int], Run]
) -> dict[str, float | str]:
    args.loss_scale = scale
    args.seed = seed
    batches = make_batches(args.steps, seed)
    bad_steps = set(range(args.first_bad, args.steps - AFTER, args.bad_every))
    if mode in {"none", "oracle-skip"} and (scale, seed) in cache:
        clean = cache[scale, seed]  # without bad batches both train exactly alike
    else:
        clean = train(mode, batches, set(), args)
        if mode in {"none", "oracle-skip"}:
            cache[scale, seed] = clean
    bad = train(mode, batches, bad_steps, args)
    flagged = spike_steps(bad.losses, bad_steps)
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
        "spike_events": sum(any(t + k in flagged for k in range(1, AFTER + 1)) for t in bad_steps),
        "spike_steps_clean": len(spike_steps(clean.losses, set())),
        "final_loss_clean": statistics.mean(clean.losses[tail]),
        "final_loss_bad": statistics.mean(bad.losses[tail]),
        "clipped_share_clean": clean.clipped / len(batches),
        "clipped_share_bad": bad.clipped / len(batches),
        "clipped_share_clean_after_warmup": clean.clipped_after_warmup / (len(batches) - args.warmup),
        "skipped_clean": clean.skipped,
        "skipped_bad": bad.skipped,
        "clean_max_z": clean.clean_max_z,
        "bad_min_z": bad.bad_min_z,
        "healthy_norm_median": statistics.median(clean.norms[args.warmup :]),
        "clip_us_p50": statistics.median(clean.clip_seconds) * 1e6,
        "clip_share_of_step": statistics.median(clean.clip_seconds) / statistics.median(clean.step_seconds),
    }


def table(rows: list[dict[str, float | str]]) -> str:
    head = (
        "| loss scale | seed | clipping | damage (Σ extra loss, 20 steps) "
        "| spike events (bad run) / flagged steps (clean run) | final loss clean / bad "
        "| clipped % (clean / bad / clean after warm-up) | skipped steps (clean / bad) "
        "| z: clean max / bad batch min "
        "| healthy norm | clip µs/step (share) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        share = 100 * float(r["clip_share_of_step"])
        adaptive = r["mode"] in CLIPPERS
        skipped = f"{r['skipped_clean']} / {r['skipped_bad']}" if adaptive else "-"
        max_z = f"{r['clean_max_z']:.1f} / {r['bad_min_z']:.0f}" if adaptive else "-"
        lines.append(
            f"| {r['loss_scale']} | {r['seed']} | {r['mode']} | {r['damage']:.3f} "
            f"| {r['spike_events']} / {r['spike_steps_clean']} "
            f"| {r['final_loss_clean']:.4f} / {r['final_loss_bad']:.4f} "
            f"| {100 * float(r['clipped_share_clean']):.1f} / {100 * float(r['clipped_share_bad']):.1f} / "
            f"{100 * float(r['clipped_share_clean_after_warmup']):.1f} "
            f"| {skipped} | {max_z} "
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
        modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
        nbad = sum(int(r["bad_batches"]) for r in rows if r["mode"] == "fixed" and r["loss_scale"] == scale)

        def ratios(mode: str, scale: float = scale, seeds: list[int] = seeds) -> str:
            per_seed = []
            for seed in seeds:
                by = {r["mode"]: r for r in rows if r["loss_scale"] == scale and r["seed"] == seed}
                fixed_damage = float(by["fixed"]["damage"])
                per_seed.append(float(by[mode]["damage"]) / fixed_damage if fixed_damage > 0 else math.nan)
            ratio = mean(mode, "damage") / mean("fixed", "damage")
            return f"{ratio:.3f} (per seed {', '.join(f'{r:.2f}' for r in per_seed)})"

        final = mean("adaptive", "final_loss_clean") / mean("fixed", "final_loss_clean") - 1
        spikes = {
            m: sum(int(r["spike_events"]) for r in rows if r["mode"] == m and r["loss_scale"] == scale)
            for m in modes
        }
        out.append(
            f"- loss scale {scale}, {len(seeds)} seed(s): damage / fixed's: adaptive {ratios('adaptive')} "
            f"(target <= 0.15), "
            + ", ".join(f"{m} {ratios(m)}" for m in modes if m not in {"fixed", "adaptive"})
            + f"; spike events (of {nbad} bad batches) "
            + ", ".join(f"{m} {n}" for m, n in spikes.items())
            + f"; adaptive clipped on {100 * mean('adaptive', 'clipped_share_clean'):.1f} % of clean steps, "
            f"{100 * mean('adaptive', 'clipped_share_clean_after_warmup'):.1f} % after warm-up "
            "(target < 10 %); "
            f"clean final loss {100 * final:+.2f} % vs fixed (target within 5 %)"
        )
    return "\n".join(out)


def clip_cost(rounds: int = 200, calls: int = 10) -> str:
    """Per-call cost of each clipping call (and of the skip-aware step) on this model's gradients.

    The callers are interleaved round by round, so a change of the machine's load hits them alike.
    """
    torch.manual_seed(0)
    model = TinyLM()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = make_batches(1, 0)[0]
    model(batch[:, :-1]).logsumexp(-1).mean().backward()
    saved = [p.grad.clone() for p in params if p.grad is not None]
    opt = torch.optim.AdamW(params, lr=1e-9, fused=True)
    zclip = AdaptiveClipper(params, ClipSettings(warmup_steps=2, skip_z_threshold=math.inf))
    adaptive = AdaptiveClipper(params, ClipSettings(warmup_steps=2))
    for clipper in (zclip, adaptive):  # past the warm-up, so the adaptive path is timed
        for _ in range(3):
            clipper.clip()
    calls_by_name: dict[str, Callable[[], object]] = {
        "get_total_norm (no clipping)": lambda: torch.nn.utils.get_total_norm([p.grad for p in params]),  # type: ignore[misc]
        "clip_grad_norm_(1.0)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "zclip clip()": zclip.clip,
        "adaptive clip()": adaptive.clip,
        "optimizer.step() (fused AdamW)": opt.step,
        "adaptive.step(optimizer)": lambda: adaptive.step(opt),
    }
    times: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for _ in range(rounds):
        for name, call in calls_by_name.items():
            for p, g in zip(params, saved, strict=True):
                p.grad = g.clone()  # clipping scales in place: start every call from the same norm
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            times[name].append((time.perf_counter() - t0) / calls)
    lines = ["| call | µs per call (median of rounds) |", "|---|---:|"]
    lines += [f"| {name} | {statistics.median(t) * 1e6:.0f} |" for name, t in times.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--first-bad", type=int, default=80)
    p.add_argument("--bad-every", type=int, default=25)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.01])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:-1]))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.bad_every <= AFTER:
        p.error(f"--bad-every must exceed {AFTER}: the damage windows after bad batches must not overlap")
    if not {"fixed", "adaptive"} <= set(args.modes):
        p.error("--modes must include fixed and adaptive: the targets compare them")
    torch.set_num_threads(1)
    started = time.perf_counter()
    cache: dict[tuple[float, int], Run] = {}
    rows = [
        measure(mode, scale, seed, args, cache)
        for scale in args.scales
        for seed in args.seeds
        for mode in args.modes
    ]
    print(table(rows))
    print()
    print(verdict(rows))
    print()
    print(clip_cost())
    print(
        f"\n{args.steps} steps, {len(rows)} (clipping, scale, seed) in {time.perf_counter() - started:.0f} s,"
        f" lr {args.lr}, torch {torch.__version__}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
