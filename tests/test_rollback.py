"""In-place rollback on a user's own trainer (tests/user_trainer.py --rollback-every), 2 gloo ranks, with the
NaN injected from outside the job as a poisoned data row on one rank only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from heal_support import taken
from toy_launch import Proc, torchrun_command, toy_env
from user_support import make_data, reference, supervised, trainer_args

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


@pytest.mark.timeout(500)
def test_nan_under_trainwarden_run_is_rolled_back_without_a_restart(tmp_path: Path) -> None:
    """Under `trainwarden run` (actions on, default routes), a NaN batch on rank 1 only is rolled back in
    place by both ranks at the same step: the same two processes finish, no restart is taken, and the final
    parameters equal those of an uninterrupted run that skipped that batch."""
    steps, nan_step = 120, 60
    data = make_data(tmp_path, steps, {nan_step: ("nan", 1)})
    reference(tmp_path / "reference", data, steps, skip=(nan_step,))
    out = tmp_path / "out"
    args = ["--rollback-every", "5", "--step-sleep", "0.05"]
    run = supervised(tmp_path, trainer_args(data, steps, *args, ckpt=tmp_path / "ckpt", out=out))
    pids = [run.rank_pid(r, 60, script="user_trainer") for r in (0, 1)]
    assert run.proc.wait(400) == 0, run.proc.output()
    records = rank_records(out)
    assert [r["pid"] for r in records] == pids, "a rank was restarted"
    assert records[0]["rollbacks"] == records[1]["rollbacks"] == [[64, 60, nan_step]], run.proc.output()
    journal = run.journal()
    assert taken(journal, "checkpoint_restart") == [], [(e.rule, e.healer, e.result) for e in journal]
    assert len(taken(journal, "rollback")) <= 1  # the job was quicker; the daemon's request changes nothing
    assert_same_parameters(out, tmp_path / "reference" / "out")


@pytest.mark.timeout(600)
def test_rollback_that_does_not_heal_escalates_to_one_checkpoint_restart(tmp_path: Path) -> None:
    """Twenty poisoned batches in a row outlast the job's own rollbacks (three in a row at most), so the NaN
    goes on after the rollback took effect: the daemon escalates to exactly one checkpoint restart, which
    skips the bad range (`skip_batches_after`), and the run ends finite and bit-identical to one that
    skipped those batches."""
    steps, first, count = 120, 60, 20
    bad = tuple(range(first, first + count))
    data = make_data(tmp_path, steps, dict.fromkeys(bad, ("nan", 1)))
    reference(tmp_path / "reference", data, steps, skip=bad)
    out = tmp_path / "out"
    # checkpoints at 59 and 119 only: a finite one inside the bad range would (rightly) refuse the restart
    args = ["--rollback-every", "5", "--step-sleep", "0.05", "--ckpt-every", "60"]
    skip_range = f"\n[healers.checkpoint_restart]\nskip_batches_after = {count - 1}\n"
    run = supervised(
        tmp_path, trainer_args(data, steps, *args, ckpt=tmp_path / "ckpt", out=out), extra_config=skip_range
    )
    assert run.proc.wait(500) == 0, run.proc.output()
    journal = run.journal()
    summary = [(e.rule, e.healer, e.decision, e.result, e.reason[:80]) for e in journal]
    assert len(taken(journal, "rollback")) == 1, summary
    restarts = taken(journal, "checkpoint_restart")
    assert len(restarts) == 1, summary
    assert "escalating: nonfinite persisted" in restarts[0].reason
    assert_same_parameters(out, tmp_path / "reference" / "out")
