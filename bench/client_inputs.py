"""What the client's input hardening costs: the non-finite check per save, the safe control read.

Measures, in one run and on one machine:
  - `CheckpointManager.save` of a model with AdamW state, with the non-finite check and with it
    replaced by a no-op (the baseline): the check's share of a save;
  - `nonfinite_tensors` alone on the same state;
  - `read_control` (regular-file check, bounded read, strict validation) against the plain
    `Path.read_text` + `json.loads` it replaced, on the same control file.

Usage: .venv/bin/python bench/client_inputs.py [--width 1024] [--layers 8] [--rounds 5] [--reads 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainwarden.client import checkpoint as checkpoint_module
from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.finite import nonfinite_tensors
from trainwarden.control import ClipSettings, ControlState, read_control, write_control


def _median_seconds(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_save(width: int, layers: int, rounds: int) -> dict[str, float]:
    """Median save time with and without the check, and the check alone."""
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    state = {"train": ModelOptimizerState(model, opt)}
    with tempfile.TemporaryDirectory() as root:
        manager = CheckpointManager(root, keep_last=1)
        step = iter(range(10**6))
        with_check = _median_seconds(lambda: manager.save(next(step), state), rounds)
        original = checkpoint_module.nonfinite_tensors
        checkpoint_module.nonfinite_tensors = lambda _state: []  # type: ignore[assignment]
        try:
            without = _median_seconds(lambda: manager.save(next(step), state), rounds)
        finally:
            checkpoint_module.nonfinite_tensors = original
    check = _median_seconds(lambda: nonfinite_tensors(state), rounds)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "save_s": with_check, "save_baseline_s": without, "check_s": check}


def bench_control(reads: int) -> dict[str, float]:
    """Per-read cost of the safe reader against read_text + json.loads."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "job.control.json"
        write_control(
            path,
            ControlState(job="job", clip=ClipSettings(), checkpoint_request="tw-1", skip_batches=((5, 7),)),
        )

        def safe() -> None:
            for _ in range(reads):
                read_control(path)

        def plain() -> None:
            for _ in range(reads):
                json.loads(path.read_text(encoding="utf-8"))

        return {
            "safe_us": _median_seconds(safe, 3) / reads * 1e6,
            "plain_us": _median_seconds(plain, 3) / reads * 1e6,
        }


def main() -> None:
    """Run both benches and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reads", type=int, default=20_000)
    args = parser.parse_args()
    save = bench_save(args.width, args.layers, args.rounds)
    control = bench_control(args.reads)
    print(f"model: {save['params'] / 1e6:.1f} M parameters + AdamW state, {args.rounds} rounds (median)")
    print(f"save with the non-finite check   {save['save_s'] * 1e3:9.1f} ms")
    print(f"save without it (baseline)       {save['save_baseline_s'] * 1e3:9.1f} ms")
    print(f"the check alone                  {save['check_s'] * 1e3:9.1f} ms")
    print(f"check / baseline save            {save['check_s'] / save['save_baseline_s']:9.3f}")
    print(f"save / baseline save             {save['save_s'] / save['save_baseline_s']:9.3f}")
    print(f"read_control (safe, validated)   {control['safe_us']:9.1f} us per read")
    print(f"read_text + json.loads           {control['plain_us']:9.1f} us per read")
    print(f"safe / plain                     {control['safe_us'] / control['plain_us']:9.2f}")


if __name__ == "__main__":
    main()
