"""Per-step cost of the Lightning and Hugging Face callbacks, as a ratio of the same step without them.

One process on CPU, a ~250 k-parameter MLP (256 -> 512 -> 256 -> 16, batch 64), AdamW. The reporter
talks to a real Unix stream socket whose reader discards everything (a daemon that keeps up), and
the control file exists, so every step pays for what it would under `trainwarden run`: the step
record, the control-file stat, the boundary decision.

For each framework, runs alternate (so a change of the machine's load hits every variant alike):

- **bare**: the framework's own loop, its own clipping off;
- **callback, clip=False**: plus `TrainwardenCallback(clip=False)` (reporting, phases, requests);
- **bare + own clipping**: the framework clipping at 1.0 (`gradient_clip_val` / `max_grad_norm`);
- **callback, clip=True**: the callback's adaptive clipping instead of the framework's.

The step time is the median interval between consecutive step-end hooks after a warm-up, per run;
the table shows the median over rounds and the ratios callback / bare (clip off) and callback /
bare with its own clipping (clip on). A side-by-side ratio on a shared, loaded machine carries
more noise than 1 %, so the time spent inside the callback's hooks is also measured directly (each
hook of the instance wrapped in a timer; the reporter's sender thread is not in it) and shown as a
share of the bare step. Target (issue 13): <= 1 %. Run::

    .venv/bin/python bench/integrations_overhead.py                # prints a Markdown table
    .venv/bin/python bench/integrations_overhead.py --rounds 7 --steps 400
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainwarden.control import ControlState, control_path, write_control

WARMUP = 30
BATCH, IN, OUT = 64, 256, 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, OUT))


def make_data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(steps, BATCH, IN, generator=generator), torch.randint(
        0, OUT, (steps, BATCH), generator=generator
    )


STEP_HOOKS = (
    "on_before_optimizer_step",  # Lightning
    "on_train_batch_end",
    "on_pre_optimizer_step",  # transformers
    "on_optimizer_step",
    "on_step_end",
    "on_log",
)


class HookTimer:
    """Wraps the per-step hooks of one callback instance; adds up their time once the warm-up is over."""

    def __init__(self, callback: Any) -> None:
        self.seconds = 0.0
        self.armed = False  # set after WARMUP steps: set-up and first-call costs are not per-step costs
        for name in STEP_HOOKS:
            if hasattr(callback, name):
                setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                if self.armed:
                    self.seconds += time.perf_counter() - started

        return timed

    def per_step(self, steps: int) -> float:
        return self.seconds / (steps - WARMUP)


def median_interval(stamps: list[float]) -> float:
    deltas = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :], strict=False)]
    return statistics.median(deltas)


# --- a daemon that reads and discards -----------------------------------------------------------------


def start_sink(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(path))
    server.listen(8)

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


# --- Lightning ----------------------------------------------------------------------------------------


def lightning_run(steps: int, *, callback: bool, clip: bool) -> tuple[float, float]:
    import lightning.pytorch as pl  # noqa: PLC0415

    from trainwarden.integrations.lightning import TrainwardenCallback  # noqa: PLC0415

    x, y = make_data(steps)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, _batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    stamps: list[float] = []

    timer: HookTimer | None = None

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            stamps.append(time.perf_counter())
            if timer is not None and len(stamps) == WARMUP:
                timer.armed = True

    callbacks: list[pl.Callback] = [Stamp()]
    if callback:
        warden = TrainwardenCallback(clip=clip)
        timer = HookTimer(warden)
        callbacks.insert(0, warden)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        gradient_clip_val=1.0 if clip and not callback else None,
        callbacks=callbacks,
    )

    class Batches:  # an iterable, not a list: Lightning reads a list as several loaders
        def __len__(self) -> int:
            return steps

        def __iter__(self) -> Any:
            return zip(x, y, strict=True)

    trainer.fit(Module(), Batches())
    return median_interval(stamps), 0.0 if timer is None else timer.per_step(steps)


# --- Hugging Face Trainer -----------------------------------------------------------------------------


def hf_run(steps: int, *, callback: bool, clip: bool) -> tuple[float, float]:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: PLC0415

    from trainwarden.integrations.transformers import TrainwardenCallback  # noqa: PLC0415

    x, y = make_data(steps)

    class Samples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return steps * BATCH

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": x.view(-1, IN)[i], "labels": y.view(-1)[i]}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    stamps: list[float] = []

    timer: HookTimer | None = None

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *_: Any, **__: Any) -> None:
            stamps.append(time.perf_counter())
            if timer is not None and len(stamps) == WARMUP:
                timer.armed = True

    callbacks: list[Any] = [Stamp()]
    if callback:
        warden = TrainwardenCallback(clip=clip)
        timer = HookTimer(warden)
        callbacks.insert(0, warden)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            max_grad_norm=1.0 if clip and not callback else 0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=Model(), args=args, train_dataset=Samples(), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # prints every step's logs: noise in both variants
        trainer.train()
    return median_interval(stamps), 0.0 if timer is None else timer.per_step(steps)


VARIANTS = [
    ("bare", False, False),
    ("callback, clip=False", True, False),
    ("bare + own clipping", False, True),
    ("callback, clip=True", True, True),
]


def measure(
    run: Callable[..., tuple[float, float]], steps: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """variant -> (median step seconds, median seconds inside the callback's hooks per step)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in VARIANTS}
    for _ in range(rounds):
        for name, callback, clip in VARIANTS:
            times[name].append(run(steps, callback=callback, clip=clip))
    return {
        name: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        for name, values in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frameworks", default="lightning,transformers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging  # noqa: PLC0415

    logging.disable(logging.WARNING)  # the frameworks' banners; a failure still raises

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start_sink(root / "client.sock")
        os.environ.update(
            TRAINWARDEN_SOCKET=str(root / "client.sock"),
            TRAINWARDEN_CONTROL_DIR=str(root / "control"),
            TRAINWARDEN_JOB="bench",
        )
        (root / "control").mkdir()
        write_control(control_path(root / "control", "bench"), ControlState(job="bench"))
        runs = {"lightning": lightning_run, "transformers": hf_run}
        print(f"{args.rounds} rounds x {args.steps} steps, median step time after {WARMUP} warm-up steps")
        print()
        print(
            "| framework | bare step | with callback (clip=False) | ratio | in its hooks "
            "| share of bare step | bare + own clipping | callback, clip=True | ratio |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for framework in args.frameworks.split(","):
            result = measure(runs[framework], args.steps, args.rounds)
            (bare, _), (cb, hooks), (own, _), (cbclip, _) = (result[name] for name, _, _ in VARIANTS)
            print(
                f"| {framework} | {bare * 1e3:.3f} ms | {cb * 1e3:.3f} ms | {cb / bare:.3f} "
                f"| {hooks * 1e6:.0f} µs | {hooks / bare:.2%} "
                f"| {own * 1e3:.3f} ms | {cbclip * 1e3:.3f} ms | {cbclip / own:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
