"""The packaged toy job's demo features: scripted faults that fire once, skipped batches, events."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from toy_launch import toy_env
from trainwarden.control import ControlState, control_path, write_control
from trainwarden.demo.toy_job import Fault, parse_fault

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainwarden.demo.toy_job", "--steps", "12", *args],
        env=toy_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_parse_fault_accepts_kind_step_rank_and_names_a_bad_spec() -> None:
    """`hang@40:1` and `crash@3` parse; an unknown kind is rejected with the spec and the valid kinds."""
    assert parse_fault("hang@40:1") == Fault("hang", 40, 1)
    assert parse_fault("crash@3") == Fault("crash", 3, 0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'boom@3'.*crash, hang, nan, spike"):
        parse_fault("boom@3")


def test_fault_fires_once_across_restarts(tmp_path: Path) -> None:
    """With --fault-once a crash fires on the first run only: the rerun resumes past it and finishes,
    and the events file records the fault with its time."""
    ckpt, once, events = tmp_path / "ckpt", tmp_path / "once", tmp_path / "events.jsonl"
    args = ["--ckpt-dir", str(ckpt), "--ckpt-every", "4", "--fault", "crash@6", "--fault-once", str(once)]
    first = _run(tmp_path, *args, "--events", str(events))
    assert first.returncode == 1, first.stdout + first.stderr
    assert "CRASH 6" in first.stdout
    assert (once / "crash-6-r0.fired").exists()
    second = _run(tmp_path, *args, "--events", str(events))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "RESUMED 3" in second.stdout
    assert "CRASH" not in second.stdout
    kinds = [(e["event"], e.get("step")) for e in _events(events)]
    assert ("fault", 6) in kinds
    assert kinds[-1] == ("done", 12)
    assert [e for e in kinds if e[0] == "step"][-1] == ("step", 11)


def test_skip_batches_from_the_control_file_and_no_checkpoint_of_nan_parameters(tmp_path: Path) -> None:
    """Steps in the control file's skip_batches are not trained on (no NaN there, though one is
    scripted), and a run whose parameters became NaN refuses to checkpoint them."""
    control = control_path(tmp_path / "control", "toy")
    write_control(control, ControlState(job="toy", skip_batches=((5, 6),)))
    skipped = _run(tmp_path, "--nan-at-step", "5")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "SKIP 5" in skipped.stdout
    assert "SKIP 6" in skipped.stdout
    assert "loss=nan" not in skipped.stdout

    control.unlink()
    ckpt = tmp_path / "ckpt"
    nan = _run(tmp_path, "--nan-at-step", "5", "--ckpt-dir", str(ckpt), "--ckpt-every", "4")
    assert nan.returncode == 0, nan.stdout + nan.stderr
    assert "CKPT_REFUSED 7 non-finite parameters" in nan.stdout
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000000003"]
