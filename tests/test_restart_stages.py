"""A restart seen at once and measured stage by stage: the exit watcher, the stage timeline, the startup
record, and `trainwarden run` killing a crashed job's surviving rank instead of waiting for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from support import wait_until
from trainwarden.backends.exit_watch import ExitWatcher
from trainwarden.backends.restart_stages import MARKS, RestartStages, read_journal
from trainwarden.config import Config, config_from_dict
from trainwarden.daemon.rank_exits import RankExits
from trainwarden.daemon.run_cli import STAGES_FILE, run_job
from trainwarden.daemon.timeline import EventKind, TimelineEvent
from trainwarden.healers.checkpoint_restart import running
from trainwarden.model import Finding, RankProcess
from trainwarden.plugins import plugin_groups
from trainwarden.protocol import Reason, RecordError, StartupRecord, encode, parse
from trainwarden.store import Store

pytestmark = pytest.mark.timeout(90)
STAGES_JOB = Path(__file__).resolve().parent / "stages_job.py"


def test_a_restart_is_split_into_stages_from_the_marks_in_restart_order(tmp_path: Path) -> None:
    """Each stage lasts from the previous mark to its own, the total runs from the fault, and the journal
    holds the completed restart with the steps it repeats."""
    stages = RestartStages(tmp_path / "stages.jsonl")
    stages.step("job", 41, 99.0)
    stages.fault("job", 100.0, "process_gone")
    stages.restart_began("job", 100.5)
    stages.mark("job", "killed", 100.75)
    stages.mark("job", "spawned", 101.0)
    for name, at in (("process_started", 102.0), ("imported", 104.0), ("rendezvous", 104.5)):
        stages.mark("job", name, at)
    stages.mark("job", "imported", 103.0)  # the faster rank: the slowest one gates the first collective
    stages.mark("job", "checkpoint_loaded", 105.0)
    stages.step("job", 40, 106.0)
    assert stages.completed() == []  # back before its healer returned: waits for the decision's time
    stages.decided("job", 100.25, "process_gone", 99.0)
    [done] = stages.completed()
    assert done.stages() == {
        "detect": 0.25,
        "capture": 0.25,
        "kill": 0.25,
        "spawn": 0.25,
        "process_start": 1.0,
        "imports": 2.0,
        "rendezvous": 0.5,
        "checkpoint_load": 0.5,
        "first_step": 1.0,
    }
    assert done.total() == 6.0
    assert done.steps_repeated() == 2  # steps 40 and 41 done again
    [line] = read_journal(tmp_path / "stages.jsonl")
    assert line["cause"] == "process_gone"
    assert line["stages"] == done.stages()
    assert [m for m in MARKS if m in line["marks"]] == list(line["marks"])  # journaled in time order


def test_a_client_that_reports_no_startup_stages_gets_them_folded_into_the_first_step() -> None:
    """Without startup records the first-step stage spans from the last rank's process start."""
    stages = RestartStages()
    stages.restart_began("job", 10.0)
    stages.mark("job", "killed", 10.5)
    stages.mark("job", "spawned", 11.0)
    stages.mark("job", "process_started", 12.0)
    stages.decided("job", 9.5, "stall", None)
    stages.step("job", 0, 20.0)
    [done] = stages.completed()
    assert done.stages() == {
        "capture": 0.5,
        "kill": 0.5,
        "spawn": 0.5,
        "process_start": 1.0,
        "first_step": 8.0,
    }
    assert done.total() == 10.5  # no fault time known: from the decision
    assert done.steps_repeated() is None


def test_no_restart_open_means_marks_and_steps_change_nothing() -> None:
    """Marks outside a restart (the first start, a healthy run's steps) record no restart."""
    stages = RestartStages()
    stages.mark("job", "spawned", 1.0)
    for step in range(5):
        stages.step("job", step, 2.0 + step)
    assert stages.completed() == []
    assert stages.samples() == []
    with pytest.raises(ValueError, match="not one of"):
        stages.mark("job", "lunch", 3.0)


def test_the_startup_record_round_trips_and_bad_ones_are_refused_naming_the_field() -> None:
    """A startup record parses to its stage and time; an unknown stage or a wild time is a bad_field."""
    frame = encode({"type": "startup", "stage": "rendezvous", "at": 1_800_000_000.5})
    assert parse(frame[4:]) == StartupRecord("rendezvous", 1_800_000_000.5)
    for bad, field in (
        ({"type": "startup", "stage": "lunch", "at": 1.0}, "startup.stage"),
        ({"type": "startup", "stage": "imported"}, "startup.at"),
        ({"type": "startup", "stage": "imported", "at": 1e300}, "startup.at"),
        ({"type": "startup", "stage": "imported", "at": "NaN"}, "startup.at"),
    ):
        with pytest.raises(RecordError) as caught:
            parse(json.dumps(bad).encode())
        assert caught.value.reason == Reason.BAD_FIELD
        assert field in str(caught.value)


def test_the_exit_watcher_wakes_when_a_watched_process_exits_and_not_before() -> None:
    """A watched process's exit calls back once with its pid, a running one's not; a gone pid is refused."""
    exited: list[int] = []
    woke = threading.Event()
    watcher = ExitWatcher(lambda pid: (exited.append(pid), woke.set()))
    try:
        sleeper = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        runner = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        assert watcher.watch(sleeper.pid)
        assert watcher.watch(runner.pid)
        assert watcher.watch(sleeper.pid)  # idempotent
        assert not woke.is_set()
        assert sleeper.stdin is not None
        sleeper.stdin.close()  # it exits now
        assert woke.wait(30)
        assert exited == [sleeper.pid]
        assert watcher.watching() == {runner.pid}
        sleeper.wait()
        assert not watcher.watch(sleeper.pid)  # reaped: nothing to watch
    finally:
        watcher.stop()
        runner.kill()
        runner.wait()


def _rank_exits(ranks: list[RankProcess], decided: list[Finding]) -> RankExits:
    return RankExits(ranks=lambda: ranks, decide=decided.extend, store=Store(window_seconds=60.0))


def test_a_rank_dying_without_goodbye_is_one_process_gone_finding_at_once() -> None:
    """A rank whose process exits without a bye is handed to the policy as process_gone, with its pid."""
    decided: list[Finding] = []
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(1)"], stdin=subprocess.PIPE
    )
    ranks = [RankProcess("job", 1, 1, proc.pid, connected=False)]
    exits = _rank_exits(ranks, decided)
    try:
        from trainwarden.protocol import Hello  # noqa: PLC0415 - only this test sends one

        exits.on_record(0.0, "job", 1, proc.pid, Hello("job", 1, 1, 2, proc.pid, 0, 1))
        assert proc.stdin is not None
        proc.stdin.close()
        wait_until(lambda: len(decided) == 1, 30, "the crash to be decided on")
        [finding] = decided
        assert (finding.rule, dict(finding.subject)) == ("process_gone", {"job": "job", "rank": "1"})
        assert finding.evidence["pid"] == proc.pid
        assert finding.source == "exit_watch"
    finally:
        exits.stop()
        proc.wait()


def test_a_rank_that_said_goodbye_is_no_finding_when_it_exits() -> None:
    """A rank that exited cleanly (its bye was read before its connection closed) is no crash."""
    decided: list[Finding] = []
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    ranks = [RankProcess("job", 0, 0, proc.pid, connected=False, exited_cleanly=True)]
    exits = _rank_exits(ranks, decided)
    try:
        from trainwarden.protocol import Hello  # noqa: PLC0415

        exits.on_record(0.0, "job", 0, proc.pid, Hello("job", 0, 0, 2, proc.pid, 0, 1))
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
        # the watcher has seen the exit once its pid is no longer watched; its decision came before
        wait_until(lambda: proc.pid not in exits._watcher.watching(), 30, "the exit to be seen")
        exits.stop()  # joins the watcher thread: any callback has finished
        assert decided == []
    finally:
        exits.stop()


def _config(tmp: Path) -> Config:
    data: dict[str, Any] = {
        "daemon": {"listen": "127.0.0.1:0", "runtime_dir": str(tmp / "run"), "state_dir": str(tmp / "state")},
        "policy": {"cooldown_seconds": 1.0, "actions_enabled": True},
        "collectors": {"training": {"interval_seconds": 0.5}},
        "rules": {"stall": {"enabled": False}},
    }
    return config_from_dict(data, plugin_groups())


def test_a_launcher_exiting_after_its_rank_crashed_is_the_same_fault_and_restarts_once(
    tmp_path: Path,
) -> None:
    """A launcher that exits 1 once its rank died (as torchrun does) is that crash seen twice: one restart."""
    events: list[TimelineEvent] = []
    code = run_job(
        _config(tmp_path),
        [sys.executable, str(STAGES_JOB), str(tmp_path / "markers"), "--like-torchrun"],
        job="stages",
        on_event=events.append,
    )
    assert code == 0
    assert [e.kind for e in events].count(EventKind.CHILD_STARTED) == 2
    applied = [e for e in events if e.kind is EventKind.ACTION_APPLIED]
    assert [(e.rule, e.healer) for e in applied] == [("process_gone", "checkpoint_restart")]
    assert len(read_journal(tmp_path / "state" / STAGES_FILE)) == 1


def test_a_crashed_rank_not_yet_reaped_has_no_stack_to_capture() -> None:
    """A rank that exited but is not reaped yet (a zombie) is not running: no stack capture waits on it."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, 30, "a zombie")
        assert not running(proc.pid)
        assert running(os.getpid())
    finally:
        proc.wait()
    assert not running(proc.pid)


def test_a_crashed_ranks_blocked_peer_is_killed_and_the_job_restarts_once_with_every_stage(
    tmp_path: Path,
) -> None:
    """Under `trainwarden run`, a rank dying while its peer blocks forever (as in a collective with a dead
    peer) restarts the job once: the peer is killed, not waited for, and the restart's stages are recorded
    in order, from the fault to the first new step."""
    events: list[TimelineEvent] = []
    code = run_job(
        _config(tmp_path),
        [sys.executable, str(STAGES_JOB), str(tmp_path / "markers")],
        job="stages",
        on_event=events.append,
    )
    assert code == 0  # the blocked peer never exits on its own: only the restart's kill ended that run
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.CHILD_STARTED) == 2
    applied = [e for e in events if e.kind is EventKind.ACTION_APPLIED]
    assert [(e.rule, e.healer) for e in applied] == [("process_gone", "checkpoint_restart")]
    [restart] = read_journal(tmp_path / "state" / STAGES_FILE)
    assert restart["cause"] == "process_gone"
    assert list(restart["marks"]) == list(MARKS)  # every mark, and in restart order
    assert set(restart["stages"]) == {
        "detect",
        "capture",
        "kill",
        "spawn",
        "process_start",
        "imports",
        "rendezvous",
        "checkpoint_load",
        "first_step",
    }
    assert restart["last_step_before"] == 2
    assert restart["first_step_after"] == 2
    assert restart["steps_repeated"] == 1
