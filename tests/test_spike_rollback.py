"""The Snapshotter's job-side loss-spike check (`SpikeCheck`): its decision on hostile values, a spike rolled
back in one process and ending bit-identical to a run that skipped the batch, no rollback on healthy runs
under real LR schedules, and the daemon's rollback healer leaving a job that healed itself alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from trainwarden.client.snapshot import Snapshotter
from trainwarden.client.spike_check import LossTrend, SpikeCheck
from trainwarden.collectors.training_metrics import ROLLBACK_CAPABLE, TRAIN_STEP
from trainwarden.control import control_path
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.healers.policy import Policy
from trainwarden.healers.rollback import RollbackHealer, RollbackOptions
from trainwarden.journal import Journal
from trainwarden.model import Finding, Severity
from trainwarden.policy_config import PolicyConfig
from trainwarden.rules.spike import SpikeOptions, find_spike
from trainwarden.store import Store

QUICK = SpikeCheck(min_baseline_points=20)


def noisy(n: int, seed: int = 0, level: float = 1.0) -> list[float]:
    """A flat loss with ~10 % multiplicative noise."""
    gen = torch.Generator().manual_seed(seed)
    return [level * math.exp(0.1 * float(v)) for v in torch.randn(n, generator=gen)]


def trend_of(values: list[float], check: SpikeCheck = QUICK) -> LossTrend:
    trend = LossTrend(check)
    trend.accept(list(range(len(values))), values)
    return trend


# --- the decision ---------------------------------------------------------------------------------


def test_first_spiking_step_of_the_interval_is_found_with_its_ratio() -> None:
    """A 10x loss among noise is the spike; a later, larger one in the same interval does not hide it."""
    trend = trend_of(noisy(60))
    found = trend.first_spike([60, 61, 62, 63, 64], [1.0, 10.0, 1.1, 40.0, 1.0])
    assert found is not None
    assert found.step == 61
    assert 8.0 < found.ratio < 12.0
    assert found.reason.startswith("loss spike (x")
    assert found.reason.endswith(" over the trend)")


def test_nothing_is_a_spike_during_warm_up_or_below_the_jump_ratio() -> None:
    """Before `min_baseline_points` accepted points nothing fires; on a very quiet series a 2x jump has a
    huge z-score but stays under `min_jump_ratio` (3): not a spike, as in the daemon's rule."""
    assert trend_of(noisy(10)).first_spike([10], [100.0]) is None
    quiet = [1.0 + 0.001 * (i % 3) for i in range(60)]
    assert trend_of(quiet).first_spike([60], [2.0]) is None
    assert trend_of(quiet).first_spike([60], [3.5]) is not None


def test_the_decision_is_the_daemon_rules_decision_on_the_same_series() -> None:
    """One detector: on the same points the client's check and the rule's `find_spike` agree."""
    values = noisy(80, seed=3)
    values[70] = 8.0
    options = SpikeOptions(min_baseline_points=20)
    check = SpikeCheck(min_baseline_points=20)
    hit = find_spike(values, 65, options)
    found = trend_of(values[:65], check).first_spike(list(range(65, 80)), values[65:])
    assert hit is not None
    assert found is not None
    assert (found.step, found.ratio) == (hit.index, hit.ratio)


def test_the_checks_defaults_are_the_daemon_rules_defaults() -> None:
    names = ["z_threshold", "min_jump_ratio", "min_baseline_points", "baseline_points", "trend_points"]
    names += ["min_scale_ratio"]
    check, options = SpikeCheck(), SpikeOptions()
    assert [getattr(check, n) for n in names] == [getattr(options, n) for n in names]


def test_hostile_losses_never_raise_and_never_enter_the_trend() -> None:
    """NaN, +-inf, zero and negative losses are no spike (the non-finite check owns NaN/inf) and are not
    accepted into the trend; a huge finite loss is a spike; a history of huge values still works."""
    trend = trend_of(noisy(60))
    hostile = [math.nan, math.inf, -math.inf, 0.0, -5.0]
    assert trend.first_spike(list(range(60, 65)), hostile) is None
    found = trend.first_spike(list(range(60, 66)), [*hostile, 1e308])
    assert found is not None
    assert found.step == 65
    trend.accept(list(range(60, 65)), hostile)
    assert [s for s, _ in trend.points] == list(range(60))
    huge = trend_of([1e300 * v for v in noisy(60)])
    assert huge.first_spike([60], [1e300]) is None
    assert trend_of([1e-300 * v for v in noisy(60)]).first_spike([60], [1e-290]) is not None


def test_trend_keeps_only_what_the_detector_reads_and_forgets_rolled_back_steps() -> None:
    check = SpikeCheck(min_baseline_points=20, baseline_points=30, trend_points=10)
    trend = trend_of(noisy(100), check)
    assert [s for s, _ in trend.points] == list(range(60, 100))
    trend.forget_from(90)
    assert [s for s, _ in trend.points] == list(range(60, 90))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("z_threshold", {"z_threshold": 0.0}),
        ("min_jump_ratio", {"min_jump_ratio": 0.5}),
        ("min_baseline_points", {"min_baseline_points": 2}),
        ("baseline_points", {"baseline_points": 10, "min_baseline_points": 20}),
        ("trend_points", {"trend_points": 1}),
        ("min_scale_ratio", {"min_scale_ratio": -1.0}),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=field):
        SpikeCheck(**kwargs)


# --- in one process ---------------------------------------------------------------------------------


def classes(seed: int, steps: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 4-class task: class templates plus noise, `steps` batches."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, 16, generator=gen)
    labels = torch.randint(0, 4, (steps, batch), generator=gen)
    return templates[labels] + 1.5 * torch.randn(steps, batch, 16, generator=gen), labels


def train(
    steps: int,
    *,
    spike_at: tuple[int, ...] = (),
    check: SpikeCheck | None = QUICK,
    skipped: tuple[int, ...] = (),
    loss_at: dict[int, Any] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Snapshotter]:
    """An MLP with dropout, AdamW and no clipping; `spike_at` batches scaled x1000 (unabsorbed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = Snapshotter({"m": model, "o": optimizer}, every=5, spike=check)
    snap.load_state_dict({"skipped": list(skipped)})
    xs, ys = classes(seed, steps)
    for step in snap.steps(0, steps):
        x = xs[step] * (1000.0 if step in spike_at else 1.0)
        optimizer.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), ys[step])
        loss.backward()
        optimizer.step()
        reported = (loss_at or {}).get(step, loss.detach())
        snap.after_step(step, loss=reported)
    return model, snap


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_spike_is_rolled_back_and_ends_bit_identical_to_a_run_that_skipped_the_batch() -> None:
    """A x1000 batch at step 33 (no clipper) is found at the boundary after step 34, rolled back to the
    snapshot before step 30 and skipped; the final parameters equal (torch.equal) a run that never trained
    on batch 33, and the trend holds the same points: no rolled-back or skipped step in it."""
    model, snap = train(60, spike_at=(33,))
    assert [(r.at_step, r.next_step, r.skipped) for r in snap.rollbacks] == [(34, 30, 33)]
    assert snap.rollbacks[0].reason.startswith("loss spike (x")
    reference, ref_snap = train(60, skipped=(33,))
    assert ref_snap.rollbacks == []
    assert same(model, reference)
    assert snap.loss_trend == ref_snap.loss_trend
    assert 33 not in [s for s, _ in snap.loss_trend]


def test_without_the_check_a_spike_is_not_rolled_back_and_changes_the_run() -> None:
    """The default (no `spike=`): the same spike goes through, and the run ends unlike the skip-only one."""
    model, snap = train(60, spike_at=(33,), check=None)
    assert snap.rollbacks == []
    reference, _ = train(60, skipped=(33,), check=None)
    assert not same(model, reference)


def test_hostile_loss_values_at_the_boundary() -> None:
    """NaN and inf losses roll back as non-finite (not as spikes, and not crashing the MAX); a huge finite
    float32 loss rolls back as a spike; plain floats work like tensors."""
    nan = {33: torch.tensor(math.nan)}
    _, snap = train(60, loss_at=nan)
    assert [(r.skipped, r.reason) for r in snap.rollbacks] == [(33, "non-finite loss or grad-norm")]
    _, snap = train(60, loss_at={33: math.inf})
    assert [(r.skipped, r.reason) for r in snap.rollbacks] == [(33, "non-finite loss or grad-norm")]
    _, snap = train(60, loss_at={33: torch.tensor(3e38)})
    assert [r.skipped for r in snap.rollbacks] == [33]
    assert snap.rollbacks[0].reason.startswith("loss spike (x")
    _, snap = train(60, loss_at={33: None, 34: None})  # no loss reported: never the MAX, never a spike
    assert snap.rollbacks == []
    assert {33, 34}.isdisjoint(s for s, _ in snap.loss_trend)


def test_a_loss_that_is_not_one_value_is_refused_with_the_check_on() -> None:
    snap = Snapshotter({}, spike=QUICK)
    with pytest.raises(ValueError, match="one loss value per step"):
        snap.after_step(0, loss=torch.ones(3))


def lr_at(schedule: str, step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 10)
    if schedule == "constant":
        return peak
    if schedule == "step":
        return peak * (0.1 ** ((step >= steps // 2) + (step >= 3 * steps // 4)))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@pytest.mark.parametrize("schedule", ["warmup_cosine", "step", "constant"])
def test_healthy_runs_with_the_default_check_never_roll_back(schedule: str) -> None:
    """Fault-free runs with the default `SpikeCheck()` (the daemon rule's defaults), an LR warm-up and
    cosine decay (or step decay, or none), five seeds of 600 steps each: no rollback at all."""
    steps = 600
    for seed in range(5):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        snap = Snapshotter({"m": model, "o": optimizer}, every=5, spike=SpikeCheck())
        xs, ys = classes(seed, steps)
        losses = []
        for step in snap.steps(0, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(schedule, step, steps, 3e-2)
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(model(xs[step]), ys[step])
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            snap.after_step(step, loss=loss.detach())
        assert snap.rollbacks == [], (seed, snap.rollbacks)
        assert losses[-1] < 0.5 * losses[0]  # it did learn: the series moved a lot


# --- the daemon's side: a job that healed itself ------------------------------------------------------


class ScriptedRestart(Healer):
    """Stands in for checkpoint_restart: records its calls."""

    name = "checkpoint_restart"

    def __init__(self) -> None:
        super().__init__(Healer.Options(), HealerContext())
        self.calls: list[Action] = []

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:
        self.calls.append(action)
        return ActionResult(ActionOutcome.APPLIED, "restarted")


def spike(observed: float, step: int, since: float) -> Finding:
    return Finding(
        rule="spike",
        subject={"job": "toy"},
        severity=Severity.WARNING,
        summary=f"job toy: loss spiked at step {step}",
        since=since,
        evidence={"metric": "loss", "step": step, "interruption": "transient", "observed_at": observed},
    )


class ScriptedClip(ScriptedRestart):
    """Stands in for the clip healer: records its calls."""

    name = "clip"


def healing_rig(
    tmp: Path, route: tuple[str, ...]
) -> tuple[Policy, Store, list[float], dict[str, ScriptedRestart]]:
    """A policy with the real rollback healer, spike actions routed to `route`, a job able to roll back."""
    now = [0.0]
    store = Store(window_seconds=3600)
    context = HealerContext(
        runtime_dir=tmp / "run", state_dir=tmp / "state", store=store, clock=lambda: now[0]
    )
    scripted: dict[str, ScriptedRestart] = {"checkpoint_restart": ScriptedRestart(), "clip": ScriptedClip()}
    policy = Policy(
        PolicyConfig(actions_enabled=True, alert_healers=(), routes={"spike": route}),
        {"rollback": RollbackHealer(RollbackOptions(), context), **scripted},
        Journal.in_state_dir(tmp / "state"),
        store=store,
    )
    store.add("training", [ROLLBACK_CAPABLE.sample(1.0, job="toy", rank=r) for r in ("0", "1")], 0.0)
    return policy, store, now, scripted


def steps(store: Store, *points: tuple[float, int]) -> None:
    for when, step in points:
        store.add("training", [TRAIN_STEP.sample(float(step), when, job="toy", rank="0")], when)


@pytest.mark.parametrize(
    "route",
    [
        ("rollback", "checkpoint_restart"),
        ("clip", "checkpoint_restart"),
        ("clip", "rollback", "checkpoint_restart"),
    ],
)
def test_a_spike_the_job_rolled_back_by_itself_gets_no_action(tmp_path: Path, route: tuple[str, ...]) -> None:
    """Spike actions opted in: a spike the job already rolled back by itself (its steps went back after the
    newest spike point) is observed, not acted on: no clip, no request (the rule's worst point, step 63, is
    not the job's skipped 62: a request would roll the healed job back again), no restart. A second such
    spike within `recurrence_seconds` is not read as the first action failing either: still no restart."""
    policy, store, now, scripted = healing_rig(tmp_path, route)
    # steps 60..64, the job's boundary rolled back to 60 skipping 62, and trained on
    steps(store, (9.0, 60), (9.1, 61), (9.2, 62), (9.3, 63), (9.4, 64), (9.5, 60), (9.6, 61), (9.7, 63))
    now[0] = 11.0
    outcomes = policy.tick(11.0, [spike(9.3, 63, since=10.0)])
    assert [(o.decision, o.result, o.healer) for o in outcomes] == [("observed", "healed_by_job", "rollback")]
    assert "rolled back past step 63 by itself" in outcomes[0].detail
    assert not control_path(tmp_path / "run" / "control", "toy").exists()  # no request written
    now[0] = 20.0
    assert policy.tick(20.0, [spike(9.3, 63, since=10.0)]) == []
    steps(store, (140.0, 300), (140.5, 302), (140.6, 303), (140.7, 300))
    now[0] = 142.0
    policy.tick(142.0, [spike(140.5, 302, since=141.0)])
    assert [c.healer for h in scripted.values() for c in h.calls] == []


def test_a_spike_the_job_did_not_roll_back_is_still_acted_on(tmp_path: Path) -> None:
    """The same spike on a job whose steps never went back (no job-side check): the route waits
    `job_first_steps` (10) steps past the bad one for the job's own rollback, then its first rung acts."""
    policy, store, now, scripted = healing_rig(tmp_path, ("clip", "checkpoint_restart"))
    steps(store, (9.0, 60), (9.1, 61), (9.2, 62), (9.3, 63), (9.4, 64), (9.5, 65))
    now[0] = 11.0
    outcomes = policy.tick(11.0, [spike(9.3, 63, since=10.0)])
    assert [(o.decision, o.result) for o in outcomes] == [("observed", "job_first")]
    assert "waiting until it reports step 73" in outcomes[0].detail
    assert policy.tick(11.5, [spike(9.3, 63, since=10.0)]) == [], "journaled once, still waiting"
    assert scripted["clip"].calls == []
    steps(store, *((10.0 + i / 10, 66 + i) for i in range(8)))  # on to step 73, never back
    now[0] = 12.0
    outcomes = policy.tick(12.0, [spike(9.3, 63, since=10.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("clip", "applied")]
    assert len(scripted["clip"].calls) == 1


def test_a_spike_waits_for_the_jobs_rollback_and_then_needs_no_action(tmp_path: Path) -> None:
    """The race the wait is for: the daemon's tick sees the spike before the job's boundary rolled it back.
    It waits; the job goes back at its boundary; from then on the finding is healed by the job."""
    policy, store, now, scripted = healing_rig(tmp_path, ("clip", "checkpoint_restart"))
    steps(store, (9.0, 60), (9.1, 61), (9.2, 62), (9.3, 63))
    now[0] = 9.35
    outcomes = policy.tick(9.35, [spike(9.2, 62, since=9.3)])
    assert [o.result for o in outcomes] == ["job_first"]
    steps(store, (9.4, 64), (9.5, 60), (9.6, 61), (9.7, 63))  # the boundary after 64 went back, skipping 62
    now[0] = 10.0
    outcomes = policy.tick(10.0, [spike(9.2, 62, since=9.3)])
    assert [o.result for o in outcomes] == ["healed_by_job"]
    assert [c.healer for h in scripted.values() for c in h.calls] == []


def test_job_first_steps_accepts_zero_and_refuses_a_negative_count_by_name() -> None:
    """`[healers.rollback] job_first_steps = 0` turns the wait off; a negative count is a config error."""
    assert RollbackOptions(job_first_steps=0).problems() == []
    assert [field for field, _ in RollbackOptions(job_first_steps=-1).problems()] == ["job_first_steps"]


def test_the_rollback_healer_writes_nothing_for_a_job_that_already_went_back(tmp_path: Path) -> None:
    """Asked directly (the policy's own check passed: e.g. a NaN whose newest point came after the job's
    rollback), the healer still writes no request once the job's steps went back past the bad step."""
    _, store, now, _ = healing_rig(tmp_path, ("rollback",))
    steps(store, (9.0, 60), (9.4, 64), (9.5, 60), (9.6, 61))
    now[0] = 11.0
    healer = RollbackHealer(
        RollbackOptions(),
        HealerContext(
            runtime_dir=tmp_path / "run", state_dir=tmp_path / "state", store=store, clock=lambda: now[0]
        ),
    )
    action = Action("rollback", key="k", reason="r", subject={"job": "toy"}, params={"step": 62})
    result = healer.apply(action, dry_run=False)
    assert result.outcome is ActionOutcome.NOOP
    assert "already rolled back past step 62" in result.detail
    assert not control_path(tmp_path / "run" / "control", "toy").exists()
