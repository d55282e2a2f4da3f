r"""A Lightning user's job with `TrainwardenCallback`: the integration tests run it (DDP over gloo, CPU).

Written like a user would: a LightningModule, a `ModelCheckpoint(save_last=True)` every 10 steps,
``trainer.fit(..., ckpt_path="last")`` and ``raise SystemExit(warden.exit_status)``. The data loader is
resumable (``state_dict`` / ``load_state_dict``, the interface Lightning saves mid-epoch), so a resumed
run continues at the next batch; each rank reads its own slice of `integration_data` (no sampler).

    python -m torch.distributed.run --nproc-per-node 2 tests/integration_lightning_job.py \
        --data /tmp/d --steps 60 --ckpt-dir /tmp/ckpt --out /tmp/out

Rank 0 prints ``STEP <step> <loss>`` per step, ``RESUMED <step>`` and ``FINAL <sha256>``; `--out`
gets ``final.json`` (digest, finite, exit status).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from integration_data import EPOCH, digest, write_final
from trainer_output import say
from trainwarden.integrations.lightning import TrainwardenCallback


class Batches:
    """This rank's batches of one epoch, resumable mid-epoch (Lightning saves `state_dict` with the loop).

    The epoch advances when a pass starts after a complete one, never after the last yield: Lightning
    stops at `len()` batches without exhausting the iterator, and a checkpoint saved on an epoch's
    last batch must resume at the next epoch's first batch, as the uninterrupted run continues.
    """

    def __init__(self, data: Path, rank: int) -> None:
        self.inputs = np.load(data / "inputs.npy", mmap_mode="r")
        self.labels = np.load(data / "labels.npy", mmap_mode="r")
        self.rank = rank
        self.epoch = 0
        self.yielded = 0  # batches of this epoch already yielded

    def __len__(self) -> int:
        return EPOCH

    def __iter__(self) -> Any:
        if self.yielded >= EPOCH:
            self.epoch, self.yielded = self.epoch + 1, 0
        for i in range(self.yielded, EPOCH):
            index = (self.epoch * EPOCH + i) % len(self.inputs)
            self.yielded = i + 1
            yield (
                torch.from_numpy(np.array(self.inputs[index, self.rank])),
                torch.from_numpy(np.array(self.labels[index, self.rank])),
            )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded = state["epoch"], state["yielded"]


class Classifier(pl.LightningModule):
    """A small MLP classifier trained with AdamW at a constant learning rate."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class Progress(pl.Callback):
    """Protocol lines for the tests, and an optional pause per step (so a test can act mid-run)."""

    def __init__(self, step_sleep: float) -> None:
        self.step_sleep = step_sleep

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step and trainer.is_global_zero:
            say(f"RESUMED {trainer.global_step - 1}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero:
            say(f"STEP {trainer.fit_loop.epoch_loop.total_batch_idx} {float(outputs['loss']):.6f}")
        if self.step_sleep:
            time.sleep(self.step_sleep)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="lightning")  # e.g. "num_workers" advice for a tiny loader
    torch.manual_seed(0)
    model = Classifier(args.lr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    warden = TrainwardenCallback()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(process_group_backend="gloo") if world > 1 else "auto",
        max_steps=args.steps,
        max_epochs=-1,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            warden,
            Progress(args.step_sleep),
            ModelCheckpoint(
                dirpath=args.ckpt_dir, every_n_train_steps=args.ckpt_every, save_last=True, save_top_k=1
            ),
        ],
    )
    rank = int(os.environ.get("RANK", "0"))
    trainer.fit(model, Batches(args.data, rank), ckpt_path="last")
    if trainer.is_global_zero:
        sha, finite = digest(model)
        write_final(args.out, sha, finite, warden.exit_status)
    return warden.exit_status


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
