r"""A Hugging Face Trainer user's job with `TrainwardenCallback`: the integration tests run it (gloo, CPU).

Written like a user would: an `nn.Module` that returns its loss, a map-style dataset (the Trainer's
seeded `DistributedSampler` shards it), checkpoints every 10 steps, and
``trainer.train(resume_from_checkpoint=...)`` with the newest checkpoint, then
``raise SystemExit(warden.exit_status)``.

    python -m torch.distributed.run --nproc-per-node 2 tests/integration_hf_job.py \
        --data /tmp/d --steps 60 --ckpt-dir /tmp/ckpt --out /tmp/out

Rank 0 prints ``STEP <step> <loss>`` per step, ``RESUMED <step>`` and ``FINAL <sha256>``; `--out`
gets ``final.json`` (digest, finite, exit status).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from integration_data import digest, write_final
from trainer_output import say
from trainwarden.integrations.transformers import TrainwardenCallback


class Samples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Every sample of the data file, as the Trainer's collator wants them (a dict with `labels`)."""

    def __init__(self, data: Path) -> None:
        self.inputs = np.load(data / "inputs.npy").reshape(-1, 64)
        self.labels = np.load(data / "labels.npy").reshape(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": torch.from_numpy(self.inputs[index]), "labels": torch.tensor(self.labels[index])}


class Classifier(nn.Module):
    """A small MLP classifier that returns its loss, as Trainer models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Progress(TrainerCallback):
    """Protocol lines for the tests, and an optional pause per step (so a test can act mid-run)."""

    def __init__(self, step_sleep: float) -> None:
        self.step_sleep = step_sleep

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.global_step and state.is_world_process_zero:
            say(f"RESUMED {state.global_step - 1}")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if state.is_world_process_zero and logs and "loss" in logs:
            say(f"STEP {state.global_step - 1} {logs['loss']:.6f}")

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
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
    torch.manual_seed(0)
    model = Classifier()
    warden = TrainwardenCallback()
    training = TrainingArguments(
        output_dir=str(args.ckpt_dir),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=0.0,  # the callback clips adaptively
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.ckpt_every,
        save_total_limit=3,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Samples(args.data),
        callbacks=[warden, Progress(args.step_sleep)],
    )
    last = get_last_checkpoint(str(args.ckpt_dir)) if args.ckpt_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    if trainer.is_world_process_zero():
        sha, finite = digest(model)
        write_final(args.out, sha, finite, warden.exit_status)
    return warden.exit_status


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
