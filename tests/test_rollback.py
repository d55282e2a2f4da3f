"""In-place rollback on a user's own trainer (tests/user_trainer.py --rollback-every), 2 gloo ranks, with the
NaN injected from outside the job as a poisoned data row on one rank only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from toy_launch import Proc, torchrun_command, toy_env
from user_support import make_data, reference, trainer_args

pytestmark = [pytest.mark.slow]


def rank_records(out: Path) -> list[dict[str, object]]:
    """Each rank's rank<r>.json: pid, rollbacks [at, to, skipped] and skipped batches."""
    return [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]


def assert_same_parameters(got: Path, expected: Path) -> None:
    """torch.equal on every tensor of two final.pt state dicts."""
    mine = torch.load(got / "final.pt", weights_only=True)
    theirs = torch.load(expected / "final.pt", weights_only=True)
    assert mine.keys() == theirs.keys()
    unequal = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert unequal == [], f"parameters differ from the skip-only reference: {unequal}"


@pytest.mark.timeout(300)
def test_nan_on_one_rank_rolls_both_back_in_place_and_ends_bit_identical(tmp_path: Path) -> None:
    """Without any daemon, a NaN batch on rank 1 only makes both ranks roll back at the same step to the same
    snapshot, skip that batch and go on in the same processes; the final parameters equal (torch.equal) those
    of an uninterrupted run that skipped the same batch."""
    steps, nan_step = 60, 23
    data = make_data(tmp_path, steps, {nan_step: ("nan", 1)})
    reference(tmp_path / "reference", data, steps, skip=(nan_step,))
    out = tmp_path / "out"
    proc = Proc(
        torchrun_command(trainer_args(data, steps, "--rollback-every", "5", out=out)), toy_env(tmp_path)
    )
    assert proc.wait(240) == 0, proc.output()
    records = rank_records(out)
    assert records[0]["rollbacks"] == records[1]["rollbacks"] == [[24, 20, nan_step]], proc.output()
    assert records[0]["skipped"] == records[1]["skipped"] == [nan_step]
    assert len(re.findall(r"^ROLLBACK ", proc.output(), re.MULTILINE)) == 1
    assert_same_parameters(out, tmp_path / "reference" / "out")
