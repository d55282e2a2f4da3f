"""The rollback healer and the policy's preference for it: rollback first when the job can, a restart when
it cannot or when the rollback did not heal (real Policy, journal, store, control file; scripted restart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainwarden.collectors.training_metrics import ROLLBACK_CAPABLE, TRAIN_STEP
from trainwarden.control import ControlState, RollbackRequest, control_path, read_control, write_control
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.healers.policy import Policy
from trainwarden.healers.rollback import RollbackHealer, RollbackOptions, request_id
from trainwarden.journal import Journal
from trainwarden.model import Finding, Severity
from trainwarden.policy_config import PolicyConfig
from trainwarden.store import Store


class ScriptedRestart(Healer):
    """Stands in for checkpoint_restart (tested on its own): records its calls, always applied."""

    name = "checkpoint_restart"

    def __init__(self) -> None:
        super().__init__(Healer.Options(), HealerContext())
        self.calls: list[Action] = []

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:
        self.calls.append(action)
        return ActionResult(ActionOutcome.DRY_RUN if dry_run else ActionOutcome.APPLIED, "restarted")


class Rig:
    """A policy with the real rollback healer over a store the test fills like the training collector."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = Store(window_seconds=3600)
        context = HealerContext(runtime_dir=tmp / "run", state_dir=tmp / "state", store=self.store)
        self.rollback = RollbackHealer(RollbackOptions(), context)
        self.restart = ScriptedRestart()
        self.policy = Policy(
            PolicyConfig(actions_enabled=True, alert_healers=()),
            {"rollback": self.rollback, "checkpoint_restart": self.restart},
            Journal.in_state_dir(tmp / "state"),
            store=self.store,
        )
        self.points: list[tuple[float, float]] = []

    def ranks(self, *, capable: bool) -> None:
        """Both ranks' hellos said (or did not say) that they can roll back."""
        samples = [ROLLBACK_CAPABLE.sample(1.0 if capable else 0.0, job="toy", rank=r) for r in ("0", "1")]
        self.store.add("training", samples, 0.0)

    def steps(self, *points: tuple[float, int]) -> None:
        """Rank 0 reported these (time, step) records."""
        for when, step in points:
            self.store.add("training", [TRAIN_STEP.sample(float(step), when, job="toy", rank="0")], when)

    def control(self) -> ControlState:
        return read_control(control_path(self.tmp / "run" / "control", "toy"))

    def taken(self) -> list[tuple[str, str]]:
        entries = Journal.in_state_dir(self.tmp / "state").recent(50)
        ordered = sorted(entries, key=lambda e: e.time)
        return [(e.healer, e.result) for e in ordered if e.decision == "taken"]


def nan(observed: float, first_step: float = 40.0, since: float = 10.0) -> Finding:
    """A firing non-finite finding whose newest bad point arrived at `observed`."""
    return Finding(
        rule="nonfinite",
        subject={"job": "toy"},
        severity=Severity.CRITICAL,
        summary="job toy: NaN loss",
        since=since,
        evidence={"first_step": first_step, "interruption": "transient", "observed_at": observed},
    )


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_nan_on_a_job_that_can_roll_back_is_rolled_back_not_restarted(rig: Rig) -> None:
    """With the capability in the job's hello, the default nonfinite route writes a rollback request naming
    the first bad step into the control file, and nothing restarts the job."""
    rig.ranks(capable=True)
    outcomes = rig.policy.tick(11.0, [nan(10.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("rollback", "applied")]
    request = rig.control().rollback_request
    assert request is not None
    assert request.step == 40
    assert rig.restart.calls == []


def test_nan_on_a_job_that_cannot_roll_back_is_restarted_at_once(rig: Rig) -> None:
    """Without the capability (an older client, a loop without a Snapshotter), the rollback rung is skipped
    and the same tick restarts from a checkpoint; no control file is written for a rollback."""
    rig.ranks(capable=False)
    outcomes = rig.policy.tick(11.0, [nan(10.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("checkpoint_restart", "applied")]
    assert not control_path(rig.tmp / "run" / "control", "toy").exists()


def test_rollback_that_did_not_heal_escalates_to_one_restart(rig: Rig) -> None:
    """Once the job's steps went back (the rollback took effect), a NaN observed after that is evidence it did
    not heal: the policy climbs to checkpoint_restart, once, naming the evidence; past that it gives up."""
    rig.ranks(capable=True)
    rig.steps((9.0, 44))
    rig.policy.tick(11.0, [nan(10.0)])
    rig.steps((11.5, 45), (12.0, 41), (12.5, 42), (13.0, 43))  # back to 40, batch 40 skipped
    outcomes = rig.policy.tick(14.0, [nan(13.5)])
    assert [(o.healer, o.result) for o in outcomes] == [("checkpoint_restart", "applied")]
    assert "escalating: nonfinite persisted" in rig.restart.calls[0].reason
    assert [o.result for o in rig.policy.tick(15.0, [nan(14.5)])] == ["gave_up"]  # no third action
    assert rig.taken() == [("rollback", "applied"), ("checkpoint_restart", "applied")]
    assert len(rig.restart.calls) == 1


def test_rollback_that_healed_gets_no_second_action(rig: Rig) -> None:
    """One fault, one action: after the steps went back and no NaN came after, the still-firing finding (its
    newest bad point older than the rollback) is not acted on again."""
    rig.ranks(capable=True)
    rig.steps((9.0, 44))
    rig.policy.tick(11.0, [nan(10.0)])
    rig.steps((12.0, 41), (13.0, 45))
    assert rig.policy.tick(20.0, [nan(10.0)]) == []
    assert rig.taken() == [("rollback", "applied")]


def test_a_second_bad_batch_past_the_first_gets_a_rollback_of_its_own(rig: Rig) -> None:
    """A rollback that worked (the job trained on past the skipped batch) and a new NaN episode at a later
    step within `recurrence_seconds`: a new fault, rolled back again, not read as the first rollback failing
    (which, with the default one attempt per rung, would restart a healthy job)."""
    rig.ranks(capable=True)
    rig.steps((9.0, 44))
    rig.policy.tick(11.0, [nan(10.0)])
    rig.steps((12.0, 41), (13.0, 45), (150.0, 300))  # back below 40, then on past it
    # past the 120 s cooldown, within the 300 s recurrence window
    outcomes = rig.policy.tick(161.0, [nan(160.5, first_step=298.0, since=160.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("rollback", "applied")]
    request = rig.control().rollback_request
    assert request is not None
    assert request.step == 298
    assert rig.restart.calls == []


def test_a_new_episode_that_never_got_past_the_rolled_back_step_escalates(rig: Rig) -> None:
    """A new NaN episode at or before the step already rolled back (the job never trained past it) is
    evidence that the rollback did not heal: checkpoint_restart, once."""
    rig.ranks(capable=True)
    rig.steps((9.0, 44))
    rig.policy.tick(11.0, [nan(10.0)])
    rig.steps(
        (12.0, 39),
    )
    outcomes = rig.policy.tick(14.0, [nan(13.5, first_step=40.0, since=13.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("checkpoint_restart", "applied")]
    assert "escalating: nonfinite recurred" in rig.restart.calls[0].reason


def test_rollback_not_yet_seen_waits_instead_of_restarting(rig: Rig) -> None:
    """Until the job's steps go back, a NaN observed after the request belongs to it (the job has not reached
    its boundary yet), so no restart is stacked on the rollback; steps going back before the bad step
    (an earlier resume) are not taken for it."""
    rig.ranks(capable=True)
    rig.steps((5.0, 30), (6.0, 20), (9.0, 44))
    rig.policy.tick(11.0, [nan(10.0)])
    assert rig.policy.tick(11.5, [nan(11.4)]) == []
    assert rig.policy.tick(30.0, [nan(29.0)]) == []
    assert rig.restart.calls == []


def test_rollback_is_idempotent_and_dry_run_writes_nothing(rig: Rig) -> None:
    """Applying one action twice writes the request once; a dry run says what it would do, writes no file."""
    rig.ranks(capable=True)
    action = Action(
        "rollback",
        key="nonfinite|job=toy|10.000|rollback|0",
        reason="NaN",
        subject={"job": "toy"},
        params={"rule": "nonfinite", "first_step": 40},
    )
    dry = rig.rollback.apply(action, dry_run=True)
    assert dry.outcome is ActionOutcome.DRY_RUN
    assert not control_path(rig.tmp / "run" / "control", "toy").exists()
    assert rig.rollback.apply(action, dry_run=False).outcome is ActionOutcome.APPLIED
    assert rig.rollback.apply(action, dry_run=False).outcome is ActionOutcome.NOOP
    assert rig.control().rollback_request == RollbackRequest(action.key, 40)


def test_unreadable_control_file_is_never_overwritten(rig: Rig) -> None:
    """A control file the healer cannot parse (it may hold a stop request) fails the action, left as it is."""
    rig.ranks(capable=True)
    path = control_path(rig.tmp / "run" / "control", "toy")
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "rollback_request": {"id": "", "step": 3}}', encoding="utf-8")
    action = Action("rollback", key="k", reason="NaN", subject={"job": "toy"}, params={"first_step": 40})
    result = rig.rollback.apply(action, dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "rollback_request.id" in result.detail
    assert json.loads(path.read_text(encoding="utf-8"))["rollback_request"]["id"] == ""


def test_other_control_settings_survive_a_rollback_request(rig: Rig) -> None:
    """Writing the request keeps what other healers wrote (skip ranges, a checkpoint request)."""
    rig.ranks(capable=True)
    path = control_path(rig.tmp / "run" / "control", "toy")
    write_control(path, ControlState(job="toy", skip_batches=((5, 6),), checkpoint_request="c1"))
    action = Action("rollback", key="k", reason="NaN", subject={"job": "toy"}, params={"first_step": 40})
    assert rig.rollback.apply(action, dry_run=False).outcome is ActionOutcome.APPLIED
    state = rig.control()
    assert (state.skip_batches, state.checkpoint_request) == (((5, 6),), "c1")


def test_long_action_keys_become_bounded_request_ids() -> None:
    """An action key longer than the control file's request-id limit is sent as its digest, still unique."""
    long_key = "x" * 1000
    assert len(request_id(long_key)) <= 256
    assert request_id(long_key) != request_id(long_key + "y")
    assert request_id("short") == "short"
