"""The Lightning and Hugging Face callbacks end to end: 2 gloo ranks under torchrun and `trainwarden run`,
faults from outside the job, judged by the final parameters against an uninterrupted run without a daemon."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from heal_support import metric_value, taken
from integration_support import JOB, make_data, read_final, reference, script_name, supervised
from support import wait_until
from trainwarden.control import ControlState, control_path, write_control
from user_support import metrics_by_rank

pytestmark = [pytest.mark.slow]
FRAMEWORKS = ["lightning", "transformers"]
STEPS = 80


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data file for every run of this module."""
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def expected(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Final parameters of an uninterrupted run of each framework's job (computed on first use)."""

    class Lazy(dict[str, dict[str, object]]):
        def __missing__(self, framework: str) -> dict[str, object]:
            result = reference(framework, tmp_path_factory.mktemp(framework), data, STEPS)
            assert result["finite"] is True
            self[framework] = result
            return result

    return Lazy()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_both_ranks_report_and_a_checkpoint_request_is_answered_with_a_checkpoint(
    framework: str, tmp_path: Path, data: Path, expected: dict[str, dict[str, object]]
) -> None:
    """Both ranks' steps reach the daemon's metrics; a checkpoint request in the job's control file is
    answered at one agreed step with the framework's checkpoint, which the daemon registers for both
    ranks; the run then ends unchanged (bit-identical to a run without the daemon)."""
    want = expected[framework]
    run = supervised(framework, tmp_path, data, STEPS, "--step-sleep", "0.05")
    run.proc.wait_for(r"^STEP 15 ", 300)
    seen = metrics_by_rank(run.metrics(), "trainwarden_train_step")
    assert set(seen) == {"0", "1"}, seen
    assert min(seen.values()) >= 5, seen
    write_control(
        control_path(tmp_path / "run" / "control", JOB), ControlState(job=JOB, checkpoint_request="g6-ckpt")
    )
    answered = run.proc.wait_for(r"step (\d+): checkpoint requested \(request ids g6-ckpt\)", 60)
    step = int(answered.group(1))

    def registered() -> bool:
        text = run.metrics()
        values = [metric_value(text, "trainwarden_train_last_checkpoint_step", job=JOB, rank=r) for r in "01"]
        return all(v is not None and v >= step for v in values)

    wait_until(registered, 60, "the daemon to register the answered checkpoint for both ranks")
    if framework == "lightning":
        assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    else:
        assert (tmp_path / "ckpt" / f"checkpoint-{step + 1}" / "trainwarden.json").is_file()
    assert run.proc.wait(300) == 0, run.proc.output()
    assert read_final(tmp_path / "out") == {**want, "exit_status": 0}
    assert [e for e in run.journal() if e.decision == "taken"] == []


@pytest.mark.timeout(900)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_stopped_rank_and_a_killed_rank_are_each_healed_and_the_run_ends_exact(
    framework: str, tmp_path: Path, data: Path, expected: dict[str, dict[str, object]]
) -> None:
    """A SIGSTOPped rank, then (after the resume) a SIGKILLed one, from outside the job under
    `trainwarden run`: one restart each, both resumed from the framework's newest checkpoint, exit 0,
    and final parameters bit-identical to an uninterrupted run."""
    want = expected[framework]
    run = supervised(framework, tmp_path, data, STEPS, "--step-sleep", "0.05")
    script = script_name(framework)
    run.proc.wait_for(r"^STEP 30 ", 300)
    os.kill(run.rank_pid(1, script=script), signal.SIGSTOP)
    resumed = run.proc.wait_for(r"^RESUMED (\d+)$", 300)
    assert int(resumed.group(1)) < 30
    run.proc.wait_for(r"^STEP 60 ", 300)
    os.kill(run.rank_pid(0, script=script), signal.SIGKILL)
    assert run.proc.wait(600) == 0, run.proc.output()
    resumes = [int(m.group(1)) for line in run.proc.lines if (m := re.match(r"RESUMED (\d+)$", line))]
    assert len(resumes) == 2, run.proc.output()
    restarts = sorted(str(e.rule) for e in taken(run.journal(), "checkpoint_restart"))
    assert restarts.count("stall") == 1, restarts
    assert sum(restarts.count(r) for r in ("process_exit", "process_gone")) == 1, restarts
    assert len(restarts) == 2, restarts
    assert read_final(tmp_path / "out") == {**want, "exit_status": 0}
