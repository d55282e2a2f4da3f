"""End to end through `trainwarden run` and a real 2-rank torchrun (gloo) toy job: each fault is detected and
healed by the real collector, rules, policy, healers and the supervise backend."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from heal_support import JOB, metric_value, start_run, taken
from toy_launch import baseline_sha, final_sha
from trainwarden.backends.restart_stages import MARKS, read_journal
from trainwarden.control import control_path, read_control
from trainwarden.daemon.run_cli import STAGES_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _toy(tmp: Path, steps: int, *faults: str) -> list[str]:
    return [
        "--steps",
        str(steps),
        "--ckpt-dir",
        str(tmp / "ckpt"),
        "--ckpt-every",
        "5",
        "--step-sleep",
        "0.05",
        "--out",
        str(tmp / "out"),
        *faults,
    ]


def test_hung_rank_is_detected_stacks_captured_restarted_and_resumed_exactly(tmp_path: Path) -> None:
    """A SIGSTOPped rank stalls the job; the stall is detected, every rank's stacks are captured into the
    incident bundle, the job is restarted and resumed, and its final parameters equal an uninterrupted run."""
    steps = 110
    expected = baseline_sha(tmp_path / "baseline", steps)
    run = start_run(tmp_path, _toy(tmp_path, steps))
    run.proc.wait_for(r"^STEP 40 ", 60)
    os.kill(run.rank_pid(1), signal.SIGSTOP)
    run.proc.wait_for(r"action_applied\s+checkpoint_restart applied for stall", 40)
    assert run.proc.wait() == 0, run.proc.output()
    assert any(line.startswith("RESUMED") for line in run.proc.lines), run.proc.output()
    assert final_sha(tmp_path / "out") == expected
    actions = taken(run.journal(), "checkpoint_restart", "stall")
    assert len(actions) == 1
    bundle = Path(actions[0].incident)
    stacks = (bundle / "stacks-rank1.txt").read_text(encoding="utf-8")
    assert "via faulthandler" in stacks or "via py-spy" in stacks
    assert "toy_job.py" in stacks
    assert "toy_job.py" in (bundle / "stacks-rank0.txt").read_text(encoding="utf-8")


def test_crashed_rank_is_restarted_and_the_job_completes(tmp_path: Path) -> None:
    """A rank exiting with status 1 ends the torchrun group; the run restarts it once and the job finishes."""
    toy = _toy(
        tmp_path, 60, "--crash-at-step", "25", "--fault-rank", "1", "--fault-once", str(tmp_path / "f")
    )
    run = start_run(tmp_path, toy)
    assert run.proc.wait() == 0, run.proc.output()
    resumed = [int(line.split()[1]) for line in run.proc.lines if line.startswith("RESUMED")]
    assert resumed
    assert resumed[0] < 25
    restarts = taken(run.journal(), "checkpoint_restart")
    assert len(restarts) == 1
    assert restarts[0].rule in {"process_exit", "process_gone"}
    assert restarts[0].result == "applied"


def test_a_torchrun_crash_is_restarted_once_and_measured_stage_by_stage(tmp_path: Path) -> None:
    """A rank crashing under torchrun is seen at once (process_gone, not the launcher's exit), restarted once,
    and the restart's stages are journaled in order from the fault to the first new step."""
    toy = _toy(
        tmp_path, 50, "--crash-at-step", "20", "--fault-rank", "1", "--fault-once", str(tmp_path / "f")
    )
    run = start_run(tmp_path, toy)
    assert run.proc.wait() == 0, run.proc.output()
    restarts = taken(run.journal(), "checkpoint_restart")
    assert [(r.rule, r.result) for r in restarts] == [("process_gone", "applied")]
    [line] = read_journal(run.state / STAGES_FILE)
    assert line["cause"] == "process_gone"
    assert list(line["marks"]) == list(MARKS)  # every stage reported, in restart order
    assert line["first_step_after"] <= 20
    assert line["steps_repeated"] >= 0


def test_nan_restarts_from_the_last_valid_checkpoint_and_skips_the_bad_batch(tmp_path: Path) -> None:
    """A NaN loss is healed by a restart without a new checkpoint, from a checkpoint before the NaN, with the
    bad step's batch marked in the control file and skipped by both ranks."""
    nan_step = 40
    toy = _toy(tmp_path, 90, "--nan-at-step", str(nan_step), "--fault-once", str(tmp_path / "f"))
    run = start_run(tmp_path, toy)
    assert run.proc.wait() == 0, run.proc.output()
    actions = taken(run.journal(), "checkpoint_restart", "nonfinite")
    assert len(actions) == 1, run.proc.output()
    state = read_control(control_path(tmp_path / "run" / "control", JOB))
    assert state.should_skip(nan_step)
    assert state.checkpoint_request is None
    resumed = [int(line.split()[1]) for line in run.proc.lines if line.startswith("RESUMED")]
    assert resumed
    assert resumed[0] < nan_step
    assert f"SKIP {nan_step}" in run.proc.lines
    after = run.proc.lines[run.proc.lines.index(f"SKIP {nan_step}") :]
    assert not any("loss=nan" in line for line in after)


def test_spike_tightens_clipping_in_the_control_file_and_metrics(tmp_path: Path) -> None:
    """A loss/grad-norm spike makes the clip healer tighten the job's clipping, visible in its control file
    and in trainwarden_actions_total; no restart is needed for a first spike."""
    # step 70's batch scaled 1000x gives this toy a loss of ~150 (vs ~0.2); some batches give 0 instead
    toy = _toy(tmp_path, 200, "--spike-at-step", "70", "--fault-once", str(tmp_path / "f"))
    # a short job: a shorter warm-up; clipping changes the training, so the spike route is opted into
    run = start_run(
        tmp_path,
        toy,
        policy='routes = { spike = ["clip"] }',
        extra="[rules.spike]\nrecent_seconds = 1.5\nmin_baseline_points = 20",
    )
    run.proc.wait_for(r"action_applied\s+clip applied for spike", 60)
    text = run.metrics()
    assert metric_value(text, "trainwarden_actions_total", healer="clip", result="applied") == 1.0
    state = read_control(control_path(tmp_path / "run" / "control", JOB))
    assert state.clip is not None
    assert state.clip.z_threshold < 2.5
    assert run.proc.wait() == 0, run.proc.output()
    assert taken(run.journal(), "checkpoint_restart") == []


def test_a_fault_on_every_run_exhausts_the_budget_and_gives_up(tmp_path: Path) -> None:
    """A job that crashes on every run is restarted attempts_per_rung times, then the policy gives up and the
    run exits non-zero instead of restarting forever."""
    toy = _toy(tmp_path, 60, "--crash-at-step", "3", "--fault-rank", "1")  # no --fault-once: every run
    run = start_run(tmp_path, toy, cooldown=1.0, policy="attempts_per_rung = 2")
    code = run.proc.wait(100)
    assert code != 0
    entries = run.journal()
    assert len(taken(entries, "checkpoint_restart")) == 2
    assert [e.decision for e in entries if e.decision == "gave_up"] == ["gave_up"]
    assert any("gave_up" in line for line in run.proc.lines)
    assert sum(line.count("child_started") for line in run.proc.lines) == 3
