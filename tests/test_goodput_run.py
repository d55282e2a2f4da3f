"""Goodput under `trainwarden run` with a real 2-rank torchrun toy job, checked against its own step log.

The toy's `--events` file is the outside view: rank 0 writes one line per step with its wall time
and pid. From it the test derives what the daemon should have counted (steps redone after the
resume, the gap from the old process's last step to the new one's first, productive over wall)
and compares it with the totals the daemon saved in its state directory on the way out.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from goodput_support import outside, saved
from heal_support import start_run, taken

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def toy(tmp: Path, steps: int) -> list[str]:
    return [
        "--steps",
        str(steps),
        "--ckpt-dir",
        str(tmp / "ckpt"),
        "--ckpt-every",
        "20",
        "--step-sleep",
        "0.05",
        "--events",
        str(tmp / "events.jsonl"),
        "--out",
        str(tmp / "out"),
    ]


def test_a_crash_injected_from_outside_costs_what_the_step_log_shows(tmp_path: Path) -> None:
    """A SIGKILLed rank: repeated steps, restart time and the goodput ratio match the job's own log."""
    run = start_run(tmp_path, toy(tmp_path, 130))
    run.proc.wait_for(r"^STEP 50 ", 120)
    os.kill(run.rank_pid(1), signal.SIGKILL)  # a crash, from outside the job
    assert run.proc.wait(180) == 0, run.proc.output()
    assert len(taken(run.journal(), "checkpoint_restart")) == 1
    totals = saved(run.state)
    log = outside(tmp_path / "events.jsonl")
    wall = sum(totals.seconds.values())
    assert sum(totals.restarts.values()) == 1
    assert set(totals.restarts) <= {"process_exit", "process_gone"}
    assert log.repeated_steps > 0  # resumed from step 39, killed after step 50
    # The daemon may have heard of one step whose log line the kill prevented.
    assert log.repeated_steps <= totals.steps_repeated <= log.repeated_steps + 1
    (gap,) = log.restart_gaps
    lost = totals.seconds["detecting"] + totals.seconds["restarting"]
    assert abs(lost - gap) <= 0.02 * wall, (totals, log)
    assert abs(wall - log.wall) <= 0.02 * wall, (totals, log)
    assert abs(totals.seconds["checkpointing"] - log.checkpointing) <= 0.02 * wall, (totals, log)
    assert abs(totals.seconds["productive"] / wall - log.productive / log.wall) <= 0.02, (totals, log)


def test_a_healthy_run_is_productive_but_for_start_up_and_checkpoints(tmp_path: Path) -> None:
    """No fault: no finding, no action, nothing repeated; every second productive, start-up or checkpoint."""
    run = start_run(tmp_path, toy(tmp_path, 80))
    assert run.proc.wait(180) == 0, run.proc.output()
    # No finding reached the policy (the start-up's node preflight journals its own pass).
    assert [e for e in run.journal() if e.rule != "preflight"] == []
    totals = saved(run.state)
    log = outside(tmp_path / "events.jsonl")
    assert totals.restarts == {}
    assert totals.steps_repeated == 0
    spent = {k: v for k, v in totals.seconds.items() if v}
    assert set(spent) <= {"productive", "initialising", "checkpointing"}
    wall = sum(totals.seconds.values())
    assert abs(wall - log.wall) <= 0.02 * wall, (totals, log)
    assert abs(totals.seconds["productive"] / wall - log.productive / log.wall) <= 0.02, (totals, log)


def test_a_hang_is_detecting_until_the_stall_finding_then_restarting(tmp_path: Path) -> None:
    """A SIGSTOPped rank: detecting runs from the last step to the stall finding, then restarting."""
    run = start_run(tmp_path, toy(tmp_path, 130))
    run.proc.wait_for(r"^STEP 50 ", 120)
    os.kill(run.rank_pid(1), signal.SIGSTOP)  # a hang, from outside the job
    assert run.proc.wait(180) == 0, run.proc.output()
    assert len(taken(run.journal(), "checkpoint_restart", "stall")) == 1
    totals = saved(run.state)
    log = outside(tmp_path / "events.jsonl")
    wall = sum(totals.seconds.values())
    assert totals.restarts == {"stall": 1}
    # The config's learned stall timeout has a 4 s floor: the finding cannot come sooner.
    assert totals.seconds["detecting"] >= 4.0, totals
    (gap,) = log.restart_gaps
    lost = totals.seconds["detecting"] + totals.seconds["restarting"]
    assert abs(lost - gap) <= 0.02 * wall, (totals, log)
    assert log.repeated_steps <= totals.steps_repeated <= log.repeated_steps + 1
    assert abs(totals.seconds["productive"] / wall - log.productive / log.wall) <= 0.02, (totals, log)
