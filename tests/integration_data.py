"""Data, digests and protocol lines shared by the Lightning and Hugging Face integration jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer_output import say, state_digest

EPOCH = 25
"""Batches per epoch in the integration jobs (runs span several epochs, so resumes cross one)."""
BATCH = 8


def write_data(path: Path, batches: int, world: int = 2, seed: int = 0) -> Path:
    """`batches` batches of 8 flattened 8x8 inputs and 4-class labels for each of `world` ranks."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "inputs.npy", rng.standard_normal((batches, world, BATCH, 64), dtype=np.float32))
    np.save(path / "labels.npy", rng.integers(0, 4, (batches, world, BATCH), dtype=np.int64))
    return path


def digest(model: Any) -> tuple[str, bool]:
    """sha256 of every parameter's bytes in name order, and whether all are finite."""
    return state_digest(model.state_dict())


def write_final(out: Path | None, sha: str, finite: bool, exit_status: int) -> None:
    """``final.json`` for the test, and the FINAL line."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        record = {"sha256": sha, "finite": finite, "exit_status": exit_status}
        (out / "final.json").write_text(json.dumps(record), encoding="utf-8")
    say(f"FINAL {sha} finite={int(finite)} exit={exit_status}")


def read_final(out: Path) -> dict[str, Any]:
    """What `write_final` wrote."""
    result: dict[str, Any] = json.loads((out / "final.json").read_text(encoding="utf-8"))
    return result
