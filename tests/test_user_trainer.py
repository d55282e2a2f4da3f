"""The healing paths judged on a user's own trainer (tests/user_trainer.py, documented API only), with every
fault injected from outside the job, against an uninterrupted run without the daemon."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from heal_support import taken
from user_support import (
    final,
    findings,
    make_data,
    metrics_by_rank,
    reference,
    skipped,
    supervised,
    trainer_args,
)

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("schedule", "seed"),
    [("cosine", 0), ("constant", 1), ("cosine", 2)],
    ids=["cosine-0", "constant-1", "cosine-2"],
)
def test_fault_free_run_raises_no_finding_and_is_changed_by_nothing(
    tmp_path: Path, schedule: str, seed: int
) -> None:
    """A healthy run with warm-up + cosine (or a constant LR) under `trainwarden run` with actions enabled and
    the default rules and routes raises no finding, takes no action, and ends bit-identical to a run without
    the daemon."""
    steps = 220
    data = make_data(tmp_path, steps, seed=seed)
    extra = ["--schedule", schedule, "--seed", str(seed)]
    expected = reference(tmp_path / "reference", data, steps, *extra)
    run = supervised(
        tmp_path,
        trainer_args(
            data, steps, *extra, "--step-sleep", "0.02", ckpt=tmp_path / "ckpt", out=tmp_path / "out"
        ),
    )
    run.proc.wait_for(r"^STEP 150 ", 240)
    seen = metrics_by_rank(run.metrics(), "trainwarden_train_step")
    assert set(seen) == {"0", "1"}, "the daemon must be seeing both ranks, or 'no finding' proves nothing"
    assert min(seen.values()) >= 100
    assert run.proc.wait(300) == 0, run.proc.output()
    fired = [f for f in findings(run.state) if f["event"] == "fired"]
    assert fired == [], fired
    assert [e for e in run.journal() if e.decision == "taken"] == []
    assert final(tmp_path / "out") == expected, run.proc.output()
    assert expected["finite"] is True


@pytest.mark.timeout(600)
def test_campaign_of_nan_hang_spike_and_crash_ends_exact_with_one_action_per_fault(tmp_path: Path) -> None:
    """A NaN batch, a SIGSTOPped rank, a huge batch and a SIGKILLed rank, all from outside the job, under
    `trainwarden run`: the job ends with exit 0 and a finite model bit-identical to an uninterrupted run that
    skipped exactly the NaN batch, with one restart per fault that needs one."""
    steps, nan_step, hang_at, spike_step, crash_at = 260, 60, 100, 150, 200
    data = make_data(tmp_path, steps, {nan_step: ("nan", 1), spike_step: ("spike", 0)})
    expected = reference(tmp_path / "reference", data, steps, skip=(nan_step,))
    assert expected["finite"] is True
    run = supervised(
        tmp_path,
        trainer_args(data, steps, "--step-sleep", "0.03", ckpt=tmp_path / "ckpt", out=tmp_path / "out"),
    )
    run.proc.wait_for(rf"^STEP {hang_at} ", 300)
    os.kill(run.rank_pid(1, script="user_trainer"), signal.SIGSTOP)
    run.proc.wait_for(rf"^STEP {crash_at} ", 300)
    os.kill(run.rank_pid(0, script="user_trainer"), signal.SIGKILL)
    assert run.proc.wait(400) == 0, run.proc.output()

    outcome = final(tmp_path / "out")
    assert outcome == expected, run.proc.output()
    assert set(skipped(run)) == {nan_step}, run.proc.output()
    journal = run.journal()
    restarts = taken(journal, "checkpoint_restart")
    by_rule = sorted(str(e.rule) for e in restarts)
    assert by_rule.count("nonfinite") == 1, by_rule
    assert by_rule.count("stall") == 1, by_rule
    assert sum(by_rule.count(r) for r in ("process_exit", "process_gone")) == 1, by_rule
    assert len([e for e in journal if e.decision == "taken" and e.rule == "spike"]) <= 1


@pytest.mark.timeout(300)
def test_hang_is_restarted_when_the_trainer_names_its_own_job(tmp_path: Path) -> None:
    """A trainer that calls `Reporter.from_env(job="mine")` under `trainwarden run` without `--job` is still
    recognised as the supervised job by its processes: a hang is restarted and the run ends exact."""
    steps = 120
    data = make_data(tmp_path, steps)
    expected = reference(tmp_path / "reference", data, steps, "--job", "mine")
    run = supervised(
        tmp_path,
        trainer_args(
            data, steps, "--job", "mine", "--step-sleep", "0.03", ckpt=tmp_path / "ckpt", out=tmp_path / "out"
        ),
    )
    run.proc.wait_for(r"^STEP 40 ", 200)
    os.kill(run.rank_pid(1, script="user_trainer"), signal.SIGSTOP)
    assert run.proc.wait(240) == 0, run.proc.output()
    assert len(taken(run.journal(), "checkpoint_restart", "stall")) == 1, run.proc.output()
    outcome = final(tmp_path / "out")
    assert outcome == expected
