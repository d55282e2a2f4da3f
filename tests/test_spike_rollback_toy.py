"""The packaged toy's unabsorbed spike (`--clip none`, a batch x1000 on one rank) and the Snapshotter's
job-side spike check (`--spike-check`), 2 gloo ranks: rolled back in place under `trainwarden run`, and never
rolled back with the check off (the default)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from heal_support import JOB, start_run, taken, toy_command
from toy_launch import Proc, final_sha, toy_env
from trainwarden.control import ControlState, control_path, write_control

pytestmark = [pytest.mark.slow]

UNCLIPPED = ["--clip", "none", "--step-sleep", "0.05"]


def skip_only_reference(tmp: Path, steps: int, skip: int) -> str:
    """Digest of a run without rollback or daemon that skips batch `skip` (control file), no clipping."""
    env = toy_env(tmp)
    write_control(
        control_path(Path(env["TRAINWARDEN_CONTROL_DIR"]), JOB),
        ControlState(job=JOB, skip_batches=((skip, skip),)),
    )
    proc = Proc(
        toy_command(["--job", JOB, "--steps", str(steps), "--clip", "none", "--out", str(tmp / "out")]), env
    )
    assert proc.wait(240) == 0, proc.output()
    return final_sha(tmp / "out")


@pytest.mark.timeout(500)
def test_unabsorbed_spike_on_one_rank_is_rolled_back_in_place_under_trainwarden_run(tmp_path: Path) -> None:
    """A x1000 batch on rank 1 only at step 60, nothing clipping it: both ranks find the spike at the boundary
    after step 64 (the losses travel in the boundary's all-reduce), roll back to the snapshot before step 60
    and skip that batch. The same two processes finish, the daemon (spike actions opted in to the rollback
    rung) restarts nothing and at most writes a request the job already fulfilled, and the final parameters
    are bit-identical to a run that only skipped batch 60."""
    steps, spike_step = 120, 60
    expected = skip_only_reference(tmp_path / "reference", steps, spike_step)
    events = tmp_path / "events.jsonl"
    args = ["--steps", str(steps), *UNCLIPPED, "--rollback-every", "5", "--spike-check"]
    args += ["--fault", f"spike@{spike_step}:1", "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "10"]
    args += ["--events", str(events), "--out", str(tmp_path / "out")]
    routes = '[policy.routes]\nspike = ["rollback", "checkpoint_restart"]\n'
    run = start_run(tmp_path, args, extra=routes)
    pids = [run.rank_pid(r, 60) for r in (0, 1)]
    run.proc.wait_for(rf"^ROLLBACK 64 60 {spike_step}$", 300)
    assert [run.rank_pid(r, 60) for r in (0, 1)] == pids, "a rank was restarted"
    assert run.proc.wait(400) == 0, run.proc.output()

    assert [line for line in run.proc.lines if line.startswith("ROLLBACK ")] == [
        f"ROLLBACK 64 60 {spike_step}"
    ]
    # each rank logs its own rollback: both found the spike at the same boundary, one on its own loss only
    found = re.findall(
        rf"\[(\d+)\] WARNING step 64: loss spike \(x[\d.]+ over the trend\); rolled back to step 60, "
        rf"skipping batch {spike_step}$",
        run.proc.output(),
        re.MULTILINE,
    )
    assert sorted(int(pid) for pid in found) == sorted(pids), run.proc.output()
    log = [json.loads(line) for line in events.read_text(encoding="utf-8").splitlines()]
    assert [e["step"] for e in log if e["event"] == "start"] == [0], "the job was started again"
    assert {e["pid"] for e in log if e["event"] in {"start", "step", "done"}} == {pids[0]}
    journal = run.journal()
    summary = [(e.rule, e.healer, e.decision, e.result) for e in journal]
    assert taken(journal, "checkpoint_restart") == [], summary
    assert len(taken(journal, "rollback", "spike")) <= 1, summary
    assert final_sha(tmp_path / "out") == expected


@pytest.mark.timeout(300)
def test_with_the_check_off_an_unabsorbed_spike_is_not_rolled_back(tmp_path: Path) -> None:
    """The default: `--rollback-every` alone rolls back non-finite values only; a spike goes through.

    Step 64 on rank 0 (which prints its loss): a x1000 batch the model gets wrong, loss x400 its trend (a
    x1000 batch it gets right has a loss of 0 and no gradient: no spike at all).
    """
    args = ["--job", JOB, "--steps", "70", "--clip", "none", "--rollback-every", "5", "--fault", "spike@64:0"]
    proc = Proc(toy_command(args), toy_env(tmp_path))
    assert proc.wait(240) == 0, proc.output()
    losses = {
        int(m[1]): float(m[2]) for m in re.finditer(r"^STEP (\d+) loss=(\S+)$", proc.output(), re.MULTILINE)
    }
    assert losses[64] > 10 * losses[63], "the spike did not happen"
    assert sorted(losses) == list(range(70))
    assert [line for line in proc.lines if line.startswith("ROLLBACK ")] == []
