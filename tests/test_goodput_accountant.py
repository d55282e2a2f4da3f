"""The daemon's accountant: client records and policy outcomes in, the exported goodput series out."""

from __future__ import annotations

from pathlib import Path

from trainwarden.daemon.goodput import GoodputAccountant
from trainwarden.healers.policy import Outcome
from trainwarden.model import Finding, Severity
from trainwarden.protocol import ByeRecord, Hello, PhaseRecord, StepRecord
from trainwarden.store import Store


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hello(pid: int) -> Hello:
    return Hello(job="toy", rank=0, local_rank=0, world_size=1, pid=pid, restart_count=0, version=1)


def outcome(healer: str, result: str, rule: str = "stall") -> Outcome:
    finding = Finding(rule, {"job": "toy"}, Severity.CRITICAL, "toy stalled")
    return Outcome(finding, "taken", result, healer, "")


def value(store: Store, name: str, **labels: str) -> float | None:
    return store.value(name, job="toy", **labels)


def test_an_applied_restart_counts_and_other_outcomes_do_not(tmp_path: Path) -> None:
    """Only an applied checkpoint-restart is a restart; a dry run, a failure or a clip changes nothing."""
    clock = FakeClock(100.0)
    store = Store()
    accountant = GoodputAccountant(tmp_path, store, clock)
    accountant.on_record(100.0, "toy", 0, 10, hello(10))
    accountant.on_record(101.0, "toy", 0, 10, StepRecord(step=1))
    accountant.on_record(102.0, "toy", 0, 10, StepRecord(step=2))
    for ignored in (
        outcome("checkpoint_restart", "dry_run"),
        outcome("checkpoint_restart", "failed"),
        outcome("clip", "applied", rule="grad_spike"),
    ):
        accountant.on_outcome(ignored, 102.5)
    clock.now = 104.0
    accountant.on_outcome(outcome("checkpoint_restart", "applied"), 103.0)
    accountant.on_record(105.0, "toy", 0, 11, hello(11))
    accountant.on_record(106.0, "toy", 0, 11, PhaseRecord(phase="eval", event="begin"))  # restarting wins
    accountant.on_record(107.0, "toy", 0, 11, StepRecord(step=2))
    accountant.on_record(108.0, "toy", 0, 11, PhaseRecord(phase="eval", event="begin"))
    accountant.on_record(109.5, "toy", 0, 11, PhaseRecord(phase="eval", event="end"))
    accountant.on_record(110.0, "toy", 0, 11, StepRecord(step=3))
    accountant.on_record(110.0, "toy", 0, 11, ByeRecord())
    clock.now = 110.0
    accountant.tick()
    seconds = "trainwarden_goodput_seconds_total"
    assert value(store, seconds, state="initialising") == 1.0
    assert value(store, seconds, state="productive") == 2.5
    assert value(store, seconds, state="detecting") == 1.0
    assert value(store, seconds, state="restarting") == 4.0
    assert value(store, seconds, state="evaluating") == 1.5
    assert value(store, "trainwarden_goodput_restarts_total", cause="stall") == 1.0
    assert value(store, "trainwarden_goodput_steps_repeated_total") == 1.0
    assert value(store, "trainwarden_goodput_ratio") == 0.25
    status = accountant.status()["jobs"]["toy"]
    assert status["mode"] == "finished"
    assert status["wall_seconds"] == 10.0
    accountant.close()


def test_a_record_the_timeline_cannot_take_is_logged_not_raised(tmp_path: Path) -> None:
    """A bug in the accounting never reaches the collector's socket thread (its connection stays)."""
    accountant = GoodputAccountant(tmp_path, Store(), FakeClock(0.0))

    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    accountant.timeline.hello = broken  # type: ignore[method-assign]
    accountant.on_record(0.0, "toy", 0, 10, hello(10))  # does not raise
    accountant.close()
