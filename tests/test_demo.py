"""`trainwarden demo` end to end: real torchrun, real daemon; every scripted fault detected and healed."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys

import pytest

from toy_launch import free_port
from trainwarden.daemon.timeline import EventKind, TimelineEvent
from trainwarden.demo.narrator import Narrator
from trainwarden.demo.scenario import ScriptedFault, scripted_faults


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_detects_and_heals_every_fault_and_the_job_completes() -> None:
    """The demo prints each fault injected, detected by its rule and healed by its healer, a summary
    row marked ok per fault, the job finishing all its steps, and exits 0."""
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "trainwarden.daemon.cli", "demo", "--port", str(port), "--steps", "160"],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert f"http://127.0.0.1:{port}/metrics" in out
    for kind, step in (("spike", 45), ("hang", 65), ("crash", 95), ("nan", 125)):
        assert re.search(rf"FAULT +{kind} injected on rank \d at step {step}", out), out
        assert re.search(rf"^  {kind} +{step} .* ok$", out, re.MULTILINE), out
    assert re.search(r"DETECTED +spike: ", out), out
    assert re.search(r"HEALED +clip applied for spike", out), out
    assert re.search(r"DETECTED +stall: ", out), out
    assert re.search(r"HEALED +checkpoint_restart applied for stall", out), out
    assert re.search(r"HEALED +checkpoint_restart applied for (process_exit|process_gone)", out), out
    assert re.search(r"DETECTED +nonfinite: ", out), out
    assert re.search(r"HEALED +checkpoint_restart applied for nonfinite", out), out
    assert re.search(r"SKIP +batch of step 125 skipped", out), out
    assert "DONE      training finished all 160 steps" in out
    assert "final step 160/160" in out


def test_narrator_verdict_needs_detection_heal_and_resume() -> None:
    """A fault counts as healed only with its rule's finding, its healer's applied action and (for a
    restart) the job resuming afterwards; steps lost are those since the last checkpoint."""
    faults = [f for f in scripted_faults(200) if f.kind == "hang"]
    assert [f.step for f in faults] == [85]
    narrator = Narrator(io.StringIO(), 1000.0, 200)
    narrator._job_event({"event": "start", "time": 1000.0, "step": 0})
    for step in range(85):
        narrator._job_event({"event": "step", "time": 1001.0 + step * 0.1, "step": step, "loss": 1.0})
    narrator._job_event({"event": "fault", "time": 1011.0, "step": 85, "kind": "hang", "rank": 1})
    assert [r.ok for r in narrator.reports(faults)] == [False]

    narrator.on_event(TimelineEvent(EventKind.FINDING_FIRED, "stall fired", time=1014.0, rule="stall"))
    narrator.on_event(
        TimelineEvent(
            EventKind.ACTION_APPLIED, "restarted", time=1013.9, rule="stall", healer="checkpoint_restart"
        )
    )
    assert [r.ok for r in narrator.reports(faults)] == [False]  # restarted, but not resumed yet
    narrator._job_event({"event": "start", "time": 1020.0, "step": 80})
    (report,) = narrator.reports(faults)
    assert report.ok
    assert (report.detected_by, report.healed_by, report.steps_lost) == ("stall", "checkpoint_restart", 5)
    assert report.detected_at is not None
    assert report.fired_at is not None
    assert report.detected_at - report.fired_at == pytest.approx(3.0)
    printed = narrator.out.getvalue()  # type: ignore[attr-defined]
    assert "FAULT     hang injected on rank 1 at step 85" in printed
    assert "RESUMED   from the checkpoint of step 79" in printed


def test_demo_refuses_too_few_steps_and_a_taken_port(capsys: pytest.CaptureFixture[str]) -> None:
    """Too few steps for the four faults, or a metrics port already in use, stop the demo before it
    starts anything, with exit 2 and a message naming the problem."""
    from trainwarden.demo.runner import EX_USAGE, run_demo  # noqa: PLC0415

    assert run_demo(steps=100, port=0, out=io.StringIO()) == EX_USAGE
    assert "--steps >= 160" in capsys.readouterr().err
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_demo(steps=200, port=port, out=io.StringIO()) == EX_USAGE
    assert f"127.0.0.1:{port} is in use" in capsys.readouterr().err


def test_narrator_counts_a_crash_detected_by_the_jobs_own_exit() -> None:
    """A crash whose only signal is the job's non-zero exit (no rule fired before the supervisor saw
    it) counts as detected by process_exit and healed by the restart that followed."""
    faults = [f for f in scripted_faults(200) if f.kind == "crash"]
    narrator = Narrator(io.StringIO(), 1000.0, 200)
    narrator._job_event({"event": "start", "time": 1000.0, "step": 0})
    narrator._job_event({"event": "fault", "time": 1010.0, "step": 125, "kind": "crash", "rank": 0})
    narrator.on_event(TimelineEvent(EventKind.CHILD_EXITED, "exited", time=1010.5, data={"exit_code": 1}))
    narrator.on_event(
        TimelineEvent(
            EventKind.ACTION_APPLIED,
            "restarted",
            time=1010.6,
            rule="process_exit",
            healer="checkpoint_restart",
        )
    )
    narrator._job_event({"event": "start", "time": 1015.0, "step": 120})
    (report,) = narrator.reports(faults)
    assert report.ok
    assert report.detected_by == "process_exit"


def _healed_nan(narrator: Narrator, faults: list[ScriptedFault], skipped: list[int]) -> None:
    narrator._job_event({"event": "start", "time": 1000.0, "step": 0})
    narrator._job_event({"event": "fault", "time": 1010.0, "step": faults[0].step, "kind": "nan", "rank": 1})
    narrator.on_event(TimelineEvent(EventKind.FINDING_FIRED, "nan", time=1011.0, rule="nonfinite"))
    narrator.on_event(
        TimelineEvent(
            EventKind.ACTION_APPLIED, "restarted", time=1011.5, rule="nonfinite", healer="checkpoint_restart"
        )
    )
    narrator._job_event({"event": "start", "time": 1015.0, "step": faults[0].step - 5})
    for step in skipped:
        narrator._job_event({"event": "skip", "time": 1016.0, "step": step})


def test_a_nan_heal_that_skipped_other_batches_is_not_ok() -> None:
    """The demo's verdict is honest: skipping batches other than the poisoned one is reported as such."""
    faults = [f for f in scripted_faults(160) if f.kind == "nan"]
    assert [f.step for f in faults] == [125]
    wrong = Narrator(io.StringIO(), 1000.0, 160)
    _healed_nan(wrong, faults, [129, 130])
    (report,) = wrong.reports(faults)
    assert report.healed
    assert not report.ok
    assert report.verdict == "WRONG BATCHES SKIPPED (129,130; poisoned: 125)"
    right = Narrator(io.StringIO(), 1000.0, 160)
    _healed_nan(right, faults, [125, 126])
    (report,) = right.reports(faults)
    assert (report.ok, report.verdict, report.skipped) == (True, "ok", (125, 126))


def test_demo_names_missing_numpy_or_torch_before_starting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without numpy (or torch) the demo says which is missing and how to install it, exit 2."""
    from trainwarden.demo import runner  # noqa: PLC0415

    assert runner.missing_dependencies() == []
    assert runner.missing_dependencies(("numpy", "no_such_module_here")) == ["no_such_module_here"]
    monkeypatch.setattr(runner, "missing_dependencies", lambda: ["numpy", "torch"])
    assert runner.run_demo(steps=200, port=0, out=io.StringIO()) == runner.EX_USAGE
    err = capsys.readouterr().err
    assert "needs numpy and torch" in err
    assert "pip install 'trainwarden[torch]'" in err
