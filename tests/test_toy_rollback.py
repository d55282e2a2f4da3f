"""The packaged toy job with in-place rollback (`--rollback-every`) under `trainwarden run`, 2 gloo ranks:
a NaN from the toy's own fault mechanism on one rank is healed without a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heal_support import JOB, start_run, taken, toy_command
from toy_launch import Proc, final_sha, toy_env
from trainwarden.control import ControlState, control_path, write_control

pytestmark = [pytest.mark.slow]


def skip_only_reference(tmp: Path, steps: int, skip: int) -> str:
    """Digest of an uninterrupted run without rollback or daemon that skips batch `skip` (control file)."""
    env = toy_env(tmp)
    state = ControlState(job=JOB, skip_batches=((skip, skip),))
    write_control(control_path(Path(env["TRAINWARDEN_CONTROL_DIR"]), JOB), state)
    proc = Proc(toy_command(["--job", JOB, "--steps", str(steps), "--out", str(tmp / "out")]), env)
    assert proc.wait(240) == 0, proc.output()
    return final_sha(tmp / "out")


@pytest.mark.timeout(500)
def test_toy_nan_is_rolled_back_in_place_under_trainwarden_run(tmp_path: Path) -> None:
    """A NaN loss on rank 1 at step 60 makes both ranks roll back once to the snapshot before it and skip
    that batch: the same two processes finish (no restart, one start in the job's event log), the daemon
    takes no checkpoint restart (what it does for the NaN is a rollback), and the final parameters are
    bit-identical to a run that only skipped batch 60."""
    steps, nan_step = 120, 60
    expected = skip_only_reference(tmp_path / "reference", steps, nan_step)
    events = tmp_path / "events.jsonl"
    args = ["--steps", str(steps), "--step-sleep", "0.05", "--rollback-every", "5"]
    args += ["--fault", f"nan@{nan_step}:1", "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "10"]
    args += ["--events", str(events), "--out", str(tmp_path / "out")]
    run = start_run(tmp_path, args)
    pids = [run.rank_pid(r, 60) for r in (0, 1)]
    run.proc.wait_for(rf"^ROLLBACK 64 60 {nan_step}$", 300)
    assert [run.rank_pid(r, 60) for r in (0, 1)] == pids, "a rank was restarted"
    assert run.proc.wait(400) == 0, run.proc.output()

    lines = [line for line in run.proc.lines if line.startswith("ROLLBACK ")]
    assert lines == [f"ROLLBACK 64 60 {nan_step}"], run.proc.output()
    log = [json.loads(line) for line in events.read_text(encoding="utf-8").splitlines()]
    assert [e["step"] for e in log if e["event"] == "start"] == [0], "the job was started again"
    assert {e["pid"] for e in log if e["event"] in {"start", "step", "done"}} == {pids[0]}
    journal = run.journal()
    summary = [(e.rule, e.healer, e.decision, e.result) for e in journal]
    assert taken(journal, "checkpoint_restart") == [], summary
    assert {e.healer for e in journal if e.rule == "nonfinite"} <= {"rollback"}, summary
    assert final_sha(tmp_path / "out") == expected
