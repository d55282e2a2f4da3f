"""The policy: dry run, routing, escalation instead of loops, cooldown, dedupe, budget, breaker, restarts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from training_series import TrainingFeed, steady
from trainwarden import policy_config as policy_config_module
from trainwarden.config import ConfigError, load_config_text
from trainwarden.control import ControlState, control_path, read_control, write_control
from trainwarden.daemon.exporter import make_registry
from trainwarden.healers import healer_classes
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.healers.clip import ClipHealer, ClipOptions
from trainwarden.healers.policy import Policy, classify, validate_healer_names
from trainwarden.healers.policy_config import PolicyConfig
from trainwarden.incidents import IncidentWriter
from trainwarden.journal import Decision, Journal
from trainwarden.model import Finding, FindingState, MetricSpec, Severity
from trainwarden.plugins import plugin_groups
from trainwarden.store import Store


class ScriptedHealer(Healer):
    """Stands in for healers built elsewhere (checkpoint_restart, drain): records calls, scripted outcome."""

    def __init__(
        self, name: str, outcome: ActionOutcome = ActionOutcome.APPLIED, raises: bool = False
    ) -> None:
        super().__init__(Healer.Options(), HealerContext())
        self.name = name  # type: ignore[misc]
        self.outcome = outcome
        self.raises = raises
        self.calls: list[tuple[Action, bool]] = []
        self.effect_at: float | None = -1.0  # -1: in effect when applied (the default hook)

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:
        self.calls.append((action, dry_run))
        if self.raises:
            raise RuntimeError("backend exploded")
        return ActionResult(ActionOutcome.DRY_RUN if dry_run else self.outcome, f"{self.name} scripted")

    def took_effect(self, action: Action, applied_at: float) -> float | None:
        if self.effect_at == -1.0:
            return super().took_effect(action, applied_at)
        return self.effect_at


@dataclass
class Rig:
    tmp: Path
    store: Store = field(default_factory=lambda: Store(window_seconds=3600))
    healers: dict[str, Healer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        context = HealerContext(
            runtime_dir=self.tmp / "run", state_dir=self.tmp / "state", clock=lambda: 0.0, store=self.store
        )
        self.clip = ClipHealer(ClipOptions(), context)
        self.restart = ScriptedHealer("checkpoint_restart")
        self.drain = ScriptedHealer("drain")
        self.notify = ScriptedHealer("notify")
        self.healers = {h.name: h for h in (self.clip, self.restart, self.drain, self.notify)}

    def policy(self, **config: object) -> Policy:
        """A policy on this rig; spikes routed to clip then restart (opted in) unless `routes` is given."""
        config.setdefault("routes", CLIP_THEN_RESTART)
        return Policy(
            PolicyConfig(**config),  # type: ignore[arg-type]
            self.healers,
            Journal.in_state_dir(self.tmp / "state"),
            store=self.store,
            incidents=IncidentWriter(self.tmp / "state"),
        )

    def journal(self) -> Journal:
        return Journal.in_state_dir(self.tmp / "state")

    def control(self) -> ControlState:
        return read_control(control_path(self.tmp / "run" / "control", "toy"))


CLIP_THEN_RESTART = {"spike": ("clip", "checkpoint_restart")}


def spike(since: float, job: str = "toy", observed: float | None = None) -> Finding:
    """A firing spike finding; `observed` is when its newest spike point arrived (default: since)."""
    return Finding(
        rule="spike",
        subject={"job": job},
        severity=Severity.WARNING,
        summary=f"job {job}: grad_norm spiked",
        since=since,
        evidence={
            "metric": "grad_norm",
            "z": 12.0,
            "step": 61.0,
            "interruption": "transient",
            "observed_at": since if observed is None else observed,
        },
    )


def nan(since: float, job: str = "toy", first_step: float = 293.0) -> Finding:
    """A firing non-finite finding observed at `since`."""
    return Finding(
        rule="nonfinite",
        subject={"job": job},
        severity=Severity.CRITICAL,
        summary=f"job {job}: NaN loss",
        since=since,
        evidence={"first_step": first_step, "interruption": "transient", "observed_at": since},
    )


def stall(since: float, rank: str = "1", job: str = "toy", rule: str = "stall") -> Finding:
    return Finding(
        rule=rule,
        subject={"job": job, "rank": rank},
        severity=Severity.CRITICAL,
        summary=f"rank {rank} stalled",
        since=since,
        evidence={"interruption": "transient"},
    )


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_default_is_dry_run_and_touches_nothing(rig: Rig) -> None:
    """With the default config the policy only journals what it would do; no control file is written."""
    policy = rig.policy()
    outcomes = policy.tick(0.0, [spike(0.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("clip", "dry_run")]
    assert not (rig.tmp / "run" / "control").exists()
    entry = rig.journal().recent(1)[0]
    assert (entry.decision, entry.result, entry.dry_run) == (Decision.TAKEN, "dry_run", True)
    assert "would tighten" in entry.detail


def test_spike_tightens_clipping_in_control_file_and_metrics(rig: Rig) -> None:
    """An enabled policy routes a spike to clip: the control file changes and the action counter counts it."""
    write_control(
        control_path(rig.tmp / "run" / "control", "toy"), ControlState(job="toy", checkpoint_request="r1")
    )
    policy = rig.policy(actions_enabled=True)
    policy.tick(0.0, [spike(0.0)])
    control = rig.control()
    assert control.clip is not None
    assert control.clip.z_threshold == pytest.approx(2.0)
    assert control.checkpoint_request == "r1"  # other requests survive
    registry = make_registry(rig.store)
    assert (
        registry.get_sample_value("trainwarden_actions_total", {"healer": "clip", "result": "applied"}) == 1
    )
    assert registry.get_sample_value("trainwarden_policy_actions_enabled", {}) == 1


def test_spike_is_only_observed_by_default(rig: Rig) -> None:
    """Clipping changes the training: unless the user opted in, a spike is journaled and not acted on."""
    policy = rig.policy(actions_enabled=True, routes={})
    outcomes = policy.tick(0.0, [spike(0.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("none", "no_route")]
    assert not (rig.tmp / "run" / "control").exists()
    assert rig.restart.calls == []


def test_recurring_fault_escalates_instead_of_repeating(rig: Rig) -> None:
    """With the default one attempt per rung, a fault recurring after each action took effect climbs
    clip -> checkpoint_restart -> gives up, each step journaled with the evidence that justified it."""
    rig.healers["clip"] = ScriptedHealer("clip")  # in effect when applied
    policy = rig.policy(actions_enabled=True, cooldown_seconds=5)
    results = [(o.healer, o.result) for t in (0.0, 6.0, 12.0, 18.0) for o in policy.tick(t, [spike(t)])]
    assert results == [("clip", "applied"), ("checkpoint_restart", "applied"), ("none", "gave_up")]
    reasons = [e.reason for e in rig.journal().recent(10) if e.decision == "taken"]
    assert reasons[0] == "job toy: grad_norm spiked"
    assert reasons[1].startswith("escalating: spike recurred 6s after clip took effect")
    gave_up = next(e for e in rig.journal().recent(10) if e.decision == "gave_up")
    assert "recurred 6s after checkpoint_restart took effect" in gave_up.detail


def test_flapping_fault_escalates_then_gives_up(rig: Rig) -> None:
    """A fault re-firing every few seconds climbs clip -> checkpoint_restart -> gives up and alerts once,
    then stays quiet instead of looping."""
    rig.healers["clip"] = ScriptedHealer("clip")  # in effect when applied
    policy = rig.policy(actions_enabled=True, cooldown_seconds=5, attempts_per_rung=2)
    results = []
    for i in range(12):
        t = i * 6.0
        results.extend((o.healer, o.result) for o in policy.tick(t, [spike(t)]))
    assert results == [
        ("clip", "applied"),
        ("clip", "applied"),
        ("checkpoint_restart", "applied"),
        ("checkpoint_restart", "applied"),
        ("none", "gave_up"),
    ]
    assert len(rig.notify.calls) == 1
    assert rig.notify.calls[0][0].params["alert"] is True
    assert len(rig.restart.calls) == 2


def test_persistent_class_uses_persistent_ladder(rig: Rig) -> None:
    """A finding whose evidence says persistent walks the persistent ladder (e.g. to drain)."""
    policy = rig.policy(actions_enabled=True, ladders={"persistent": ("drain",)})
    gpu = Finding(
        "gpu_health", {"gpu": "0"}, Severity.CRITICAL, "XID 79", evidence={"interruption": "persistent"}
    )
    assert [o.healer for o in policy.tick(0.0, [gpu])] == ["drain"]
    assert rig.drain.calls[0][0].params["interruption"] == "persistent"
    assert classify(gpu, {"gpu_health": "planned"}) == "planned"


def test_cooldown_refuses_once_per_finding(rig: Rig) -> None:
    """A new fault of the same kind on a job acted on moments ago is refused for cooldown, journaled once."""
    policy = rig.policy(actions_enabled=True, cooldown_seconds=60, recurrence_seconds=10)
    policy.tick(0.0, [stall(0.0)])
    for t in (25.0, 26.0, 27.0):
        policy.tick(t, [stall(25.0)])
    entries = rig.journal().recent(10)
    assert [(e.decision, e.result) for e in entries] == [("taken", "applied"), ("refused", "cooldown")]
    assert len(rig.restart.calls) == 1


def test_nan_after_a_hang_restart_is_acted_on_at_once(rig: Rig) -> None:
    """Cooldowns are per action kind and subject: a NaN right after a hang restart on the same job is
    restarted at once, not after the hang restart's cooldown."""
    policy = rig.policy(actions_enabled=True, cooldown_seconds=120)
    policy.tick(0.0, [stall(0.0)])
    outcomes = policy.tick(8.0, [nan(8.0)])
    assert [(o.finding.rule, o.healer, o.result) for o in outcomes] == [
        ("nonfinite", "checkpoint_restart", "applied")
    ]
    assert rig.restart.calls[1][0].params["first_step"] == 293.0


def test_still_active_finding_is_acted_on_once(rig: Rig) -> None:
    """One fault, one action: a finding that stays firing with no new evidence is never acted on again,
    however many cooldowns pass."""
    policy = rig.policy(actions_enabled=True, cooldown_seconds=10)
    for t in range(0, 600, 5):
        policy.tick(float(t), [spike(0.0, observed=0.0), stall(0.0)])
    assert [o.params["rule"] for o, _ in rig.restart.calls] == ["stall"]
    clip = rig.control().clip
    assert clip is not None
    assert clip.z_threshold == pytest.approx(2.0)  # tightened exactly once
    assert [e.decision for e in rig.journal().recent(20)] == ["taken", "taken"]


def test_persisting_after_the_action_took_effect_escalates(rig: Rig) -> None:
    """The same finding observed again only after its action took effect (a clip acknowledged late) climbs
    one rung, and the journal says why."""
    clip = ScriptedHealer("clip")
    rig.healers["clip"] = clip
    clip.effect_at = None  # written, not acknowledged yet
    policy = rig.policy(actions_enabled=True)
    policy.tick(0.0, [spike(0.0)])
    assert policy.tick(20.0, [spike(0.0, observed=15.0)]) == []  # not in effect: no evidence
    clip.effect_at = 25.0  # acknowledged
    assert policy.tick(30.0, [spike(0.0, observed=24.0)]) == []  # observed before it took effect
    outcomes = policy.tick(40.0, [spike(0.0, observed=38.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("checkpoint_restart", "applied")]
    entry = rig.journal().by_action_key(str(outcomes[0].action_key))
    assert entry is not None
    assert entry.reason.startswith("escalating: spike persisted 13s after clip took effect")
    assert len(clip.calls) == 1


def test_clip_takes_effect_when_the_job_acknowledges_it(rig: Rig) -> None:
    """With the real clip healer, spikes while the job has not acknowledged the tightened clipping are no
    evidence against it; a spike after the job reports running with it escalates."""
    policy = rig.policy(actions_enabled=True)
    policy.tick(0.0, [spike(0.0)])
    assert policy.tick(20.0, [spike(0.0, observed=18.0)]) == []  # written, not acknowledged
    in_use = MetricSpec("trainwarden_train_clip_z_threshold", "t", labelnames=("job", "rank"))
    rig.store.replace("training", [in_use.sample(2.0, 25.0, job="toy", rank="0")], 25.0)
    assert policy.tick(26.0, [spike(0.0, observed=24.0)]) == []  # seen before the acknowledgement
    outcomes = policy.tick(40.0, [spike(0.0, observed=39.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("checkpoint_restart", "applied")]
    assert outcomes[0].finding.summary in rig.restart.calls[0][0].reason
    assert rig.restart.calls[0][0].reason.startswith("escalating: spike persisted 14s after clip took effect")


def test_clip_never_acknowledged_escalates_after_the_cooldown(rig: Rig) -> None:
    """A job that never reads its control file (plain clip_grad_norm_) keeps spiking: once the clip action
    is still not in effect a cooldown after it was written, the spike persisting past that escalates."""
    policy = rig.policy(actions_enabled=True, cooldown_seconds=30)
    policy.tick(0.0, [spike(0.0)])
    assert policy.tick(20.0, [spike(0.0, observed=19.0)]) == []
    outcomes = policy.tick(40.0, [spike(0.0, observed=35.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("checkpoint_restart", "applied")]


def test_after_giving_up_another_rule_on_the_same_fault_does_not_start_over(rig: Rig) -> None:
    """Once the policy gave up on a job's ladder (a crash loop seen by process_gone), the same crash
    reported by another rule (process_exit when the job then exits) is not restarted again."""
    policy = rig.policy(actions_enabled=True)
    policy.tick(0.0, [stall(0.0, rule="process_gone")])
    assert [o.result for o in policy.tick(25.0, [stall(25.0, rule="process_gone")])] == ["gave_up"]
    exited = Finding("process_exit", {"job": "toy"}, Severity.CRITICAL, "exit 1", since=26.0)
    assert policy.tick(26.0, [exited]) == []
    assert len(rig.restart.calls) == 1


def test_nan_recurring_after_its_restart_gives_up_with_the_reason(rig: Rig) -> None:
    """A NaN again after the restart that skipped its batch is not restarted again: the default nonfinite
    ladder has one rung, so the policy gives up and alerts, naming the evidence."""
    policy = rig.policy(actions_enabled=True)
    policy.tick(0.0, [nan(0.0)])
    outcomes = policy.tick(30.0, [nan(30.0, first_step=294.0)])
    assert [o.result for o in outcomes] == ["gave_up"]
    assert "nonfinite recurred 30s after checkpoint_restart took effect" in outcomes[0].detail
    assert len(rig.restart.calls) == 1
    assert len(rig.notify.calls) == 1


def test_same_finding_delivered_twice_acts_once(rig: Rig) -> None:
    """Duplicate deliveries of one finding occurrence (same key) lead to exactly one action."""
    policy = rig.policy(actions_enabled=True, cooldown_seconds=60)
    policy.tick(0.0, [stall(0.0), stall(0.0)])
    policy.tick(1.0, [stall(0.0)])
    assert len(rig.restart.calls) == 1


def test_resolved_and_pending_findings_are_not_acted_on(rig: Rig) -> None:
    """Only firing findings become actions."""
    policy = rig.policy(actions_enabled=True)
    resolved = Finding(
        "stall", {"job": "toy", "rank": "0"}, Severity.CRITICAL, "x", state=FindingState.RESOLVED
    )
    pending = Finding(
        "stall", {"job": "toy", "rank": "1"}, Severity.CRITICAL, "x", state=FindingState.PENDING
    )
    assert policy.tick(0.0, [resolved, pending]) == []
    assert rig.restart.calls == []


def test_global_budget_refuses(rig: Rig) -> None:
    """Past the global budget of actions per window, further subjects are refused."""
    policy = rig.policy(actions_enabled=True, max_actions_per_window=1)
    outcomes = policy.tick(0.0, [stall(0.0, job="a"), stall(0.0, job="b")])
    assert [(o.decision, o.result) for o in outcomes] == [("taken", "applied"), ("refused", "budget")]


def test_hung_job_is_restarted_once_not_per_rank(rig: Rig) -> None:
    """A hung job fires stall and collective_stuck on every rank; that is one incident and one restart,
    while another job on the node is still handled on its own."""
    policy = rig.policy(actions_enabled=True)
    findings = [stall(0.0, rank=r, rule=rule) for rule in ("stall", "collective_stuck") for r in "0123"]
    outcomes = policy.tick(0.0, [*findings, stall(0.0, job="other")])
    assert [o.result for o in outcomes].count("applied") == 2
    assert [o.result for o in outcomes].count("in_progress") == 7
    assert sorted(a.subject["job"] for a, _ in rig.restart.calls) == ["other", "toy"]
    assert policy.tick(1.0, findings) == []  # refusals are journaled once, not on every tick


def test_circuit_breaker_opens_after_failures(rig: Rig) -> None:
    """After consecutive failures of a healer its breaker opens and it is no longer called."""
    rig.restart.outcome = ActionOutcome.FAILED
    policy = rig.policy(actions_enabled=True, cooldown_seconds=1, attempts_per_rung=10, breaker_failures=2)
    for t in (0.0, 2.0, 4.0, 6.0):
        policy.tick(t, [stall(t)])
    assert len(rig.restart.calls) == 2
    assert rig.journal().recent(1)[0].result == "circuit_open"
    registry = make_registry(rig.store)
    assert registry.get_sample_value("trainwarden_policy_breaker_open", {"healer": "checkpoint_restart"}) == 1
    assert len(rig.notify.calls) == 2  # each failure alerted


def test_breaker_is_per_job_and_ignores_dry_runs(rig: Rig) -> None:
    """Failures on a job this daemon cannot act on never open the breaker for the job it can; dry runs
    that report failure never count at all."""
    rig.restart.outcome = ActionOutcome.FAILED
    dry = rig.policy(breaker_failures=2)
    for t in (0.0, 400.0, 800.0):
        dry.tick(t, [stall(t, job="stranger")])
    assert dry.status()["breakers_open"] == []
    policy = rig.policy(actions_enabled=True, cooldown_seconds=1, attempts_per_rung=10, breaker_failures=2)
    for t in (1000.0, 1002.0, 1004.0):
        policy.tick(t, [stall(t, job="stranger")])
    assert policy.status()["breakers_open"] == ["checkpoint_restart (job=stranger)"]
    rig.restart.outcome = ActionOutcome.APPLIED
    outcomes = policy.tick(1006.0, [stall(1006.0, job="mine")])
    assert [(o.finding.subject["job"], o.result) for o in outcomes] == [("mine", "applied")]


def test_healer_that_raises_is_a_failed_action(rig: Rig) -> None:
    """An exception inside a healer is journaled as a failure, never propagated."""
    rig.restart.raises = True
    outcomes = rig.policy(actions_enabled=True).tick(0.0, [stall(0.0)])
    assert outcomes[0].result == "failed"
    assert "backend exploded" in rig.journal().recent(5)[0].detail


def test_restart_mid_incident_does_not_repeat(rig: Rig) -> None:
    """A daemon restarted mid-incident (new policy, reopened journal, finding re-fires with a new since)
    does not act again on the same evidence, and escalates from where it was on new evidence."""
    first = rig.policy(actions_enabled=True, cooldown_seconds=30, attempts_per_rung=1)
    first.tick(0.0, [spike(0.0)])
    assert rig.control().clip is not None
    second = rig.policy(actions_enabled=True, cooldown_seconds=30, attempts_per_rung=1)
    # the engine's memory is gone: the same spike point re-fires as a finding with a new since
    assert [o.result for o in second.tick(3.0, [spike(3.0, observed=0.0)])] == ["in_progress"]
    assert [o.result for o in second.tick(4.0, [spike(0.0)])] == []  # the very same occurrence: deduped
    assert second.tick(40.0, [spike(3.0, observed=0.0)]) == []  # no new evidence, however long
    later = second.tick(41.0, [spike(3.0, observed=40.0)])
    assert [(o.healer, o.result) for o in later] == [("checkpoint_restart", "applied")]
    assert rig.control().clip is not None
    assert rig.control().clip.z_threshold == pytest.approx(2.0)  # clip applied exactly once


def test_action_key_journaled_before_crash_is_not_applied(rig: Rig) -> None:
    """An action journaled as pending (daemon died during it) is never applied again by its key."""
    journal = rig.journal()
    key = "stall|job=toy,rank=1|0.000"
    journal.record(
        time=-100.0,
        rule="stall",
        subject="job=toy,rank=1",
        finding_key=key,
        healer="checkpoint_restart",
        action_key=f"{key}|checkpoint_restart|0",
        decision=Decision.TAKEN,
        result="pending",
        dry_run=False,
        reason="x",
    )
    policy = rig.policy(actions_enabled=True, cooldown_seconds=10, budget_window_seconds=50)
    assert policy.tick(0.0, [stall(0.0)]) == []
    assert rig.restart.calls == []


def test_action_left_pending_by_a_dead_daemon_is_waited_for_one_cooldown(rig: Rig) -> None:
    """A restart journaled as pending (the daemon died during it) covers the job's NaN for one cooldown;
    a NaN still observed after that is evidence, and the one-rung nonfinite ladder gives up."""
    rig.journal().record(
        time=0.0,
        rule="nonfinite",
        subject="job=toy",
        finding_key="nonfinite|job=toy|0.000",
        healer="checkpoint_restart",
        action_key="nonfinite|job=toy|0.000|checkpoint_restart|0",
        decision=Decision.TAKEN,
        result="pending",
        dry_run=False,
        reason="x",
    )
    policy = rig.policy(actions_enabled=True, cooldown_seconds=60)
    assert [o.result for o in policy.tick(10.0, [nan(10.0)])] == ["in_progress"]
    assert [o.result for o in policy.tick(70.0, [nan(65.0)])] == ["gave_up"]
    assert rig.restart.calls == []


def test_unknown_healer_in_config_is_a_config_error(rig: Rig) -> None:
    """Routing a rule to a healer that is not registered is rejected at load time, naming it."""
    with pytest.raises(ConfigError) as info:
        rig.policy(routes={"spike": ("clip", "reboot_node")})
    assert "reboot_node" in str(info.value)
    assert "policy.routes" in str(info.value)


def test_default_ladder_skips_absent_healers(rig: Rig) -> None:
    """Default rungs naming healers that are not installed are skipped, not an error."""
    healers = {"clip": rig.clip}
    policy = Policy(PolicyConfig(actions_enabled=True), healers, rig.journal(), registered=["clip"])
    assert policy.ladder_for(nan(0.0)) == ()
    assert policy.ladder_for(stall(0.0)) == ()
    assert [o.result for o in policy.tick(0.0, [stall(0.0)])] == ["no_route"]


def test_incident_bundle_has_finding_windows_action_result(rig: Rig) -> None:
    """Each real action writes a bundle with the finding, the subject's windows, the action and its result."""
    steady(TrainingFeed(rig.store), ranks=2, start=0.0, count=10)
    policy = rig.policy(actions_enabled=True)
    policy.tick(11.0, [stall(11.0, rank="1")])
    entry = rig.journal().recent(1)[0]
    bundle = Path(entry.incident)
    assert sorted(p.name for p in bundle.iterdir()) == [
        "action.json",
        "finding.json",
        "result.json",
        "windows.json",
    ]
    windows = json.loads((bundle / "windows.json").read_text())
    assert any("rank=1" in name for name in windows)
    assert not any("rank=0" in name for name in windows)
    assert json.loads((bundle / "result.json").read_text())["outcome"] == "applied"


def test_policy_docstring_example_loads() -> None:
    """The documented [policy] example loads against the registered healers and merges over defaults."""
    doc = str(policy_config_module.__doc__)
    block = doc.split("::\n", 1)[1]
    toml = "\n".join(line[4:] for line in block.splitlines()[1:])
    config = load_config_text(toml, plugin_groups())
    policy = config.policy
    assert policy.actions_enabled is True
    assert policy.effective_routes()["spike"] == ("clip", "checkpoint_restart")
    assert policy.effective_routes()["nonfinite"] == ("rollback", "checkpoint_restart")  # default kept
    assert policy.effective_ladders()["persistent"] == ("checkpoint_restart", "slurm_drain")
    registered = healer_classes()
    unknown = [p.why.split("'")[1] for p in validate_healer_names(policy, registered)]
    assert all(name not in registered for name in unknown)  # only healers still to be written


def test_incident_bundles_are_pruned(tmp_path: Path) -> None:
    """Only the newest `keep` bundles stay on disk."""
    writer = IncidentWriter(tmp_path, keep=2)
    finding = stall(0.0)
    for i in range(4):
        action = Action("checkpoint_restart", f"k{i}", "x", subject=dict(finding.subject))
        writer.write(finding, action, ActionResult(ActionOutcome.APPLIED, "ok"), {}, 1_700_000_000.0 + i)
    kept = sorted(p.name for p in (tmp_path / "incidents").iterdir())
    assert len(kept) == 2
    assert kept[0].startswith("20231114T221322Z")


def test_unusable_journal_means_no_action_and_a_counted_error(rig: Rig) -> None:
    """When the journal cannot be read or written the policy does not act, and counts the error."""
    journal = rig.journal()
    policy = Policy(PolicyConfig(actions_enabled=True), rig.healers, journal, store=rig.store)
    journal.close()
    assert policy.tick(0.0, [stall(0.0)]) == []
    assert rig.restart.calls == []
    registry = make_registry(rig.store)
    assert registry.get_sample_value("trainwarden_journal_errors_total", {}) == 1


def test_journal_pruned_past_retention_and_status(rig: Rig) -> None:
    """Entries older than the retention are pruned on a tick; status reports mode, healers and breakers."""
    policy = rig.policy(actions_enabled=True, journal_retention_seconds=4000)
    policy.tick(0.0, [stall(0.0)])
    assert len(rig.journal().recent(10)) == 1
    policy.tick(5000.0, [])
    assert rig.journal().recent(10) == []
    status = policy.status()
    assert status["actions_enabled"] is True
    assert status["breakers_open"] == []
    assert "checkpoint_restart" in status["healers"]


def test_clipping_relaxes_after_spikes_stop(rig: Rig) -> None:
    """Tightened clipping steps back to its default once no spike fired for a while, then stops;
    a firing spike holds the relaxation off."""
    policy = rig.policy(actions_enabled=True, relax_clip_after_seconds=100, cooldown_seconds=1000)
    policy.tick(0.0, [spike(0.0)])
    policy.tick(0.0, [spike(0.0)])
    assert policy.tick(150.0, [spike(0.0)]) == []  # still spiking: no relaxation
    relaxed = policy.tick(260.0, [])
    assert [(o.finding.rule, o.result) for o in relaxed] == [("clip_relax", "applied")]
    clip = rig.control().clip
    assert clip is not None
    assert clip.z_threshold == 2.5
    assert [o.result for o in policy.tick(370.0, [])] == ["noop"]  # back at the default
    assert policy.tick(1000.0, []) == []


def test_a_partial_batch_never_relaxes_clipping(rig: Rig) -> None:
    """A batch that is not every active finding (a child's exit, an Alertmanager delivery) cannot show the
    spikes stopped: clipping stays tightened until the engine's own tick sees no spike."""
    policy = rig.policy(actions_enabled=True, relax_clip_after_seconds=100, cooldown_seconds=1000)
    policy.tick(0.0, [spike(0.0)])
    assert policy.tick(260.0, [], complete=False) == []
    relaxed = policy.tick(270.0, [])
    assert [(o.finding.rule, o.result) for o in relaxed] == [("clip_relax", "applied")]


def test_relaxation_does_not_count_toward_escalation(rig: Rig) -> None:
    """Relax steps are recovery, not attempts: the next spike climbs one rung, not past the ladder's end."""
    policy = rig.policy(actions_enabled=True, relax_clip_after_seconds=100, attempts_per_rung=1)
    policy.tick(0.0, [spike(0.0)])
    policy.tick(200.0, [])
    outcomes = policy.tick(250.0, [spike(250.0)])
    assert [(o.healer, o.result) for o in outcomes] == [("checkpoint_restart", "applied")]


def test_dry_run_relaxation_shows_one_step(rig: Rig) -> None:
    """In observe-only mode clipping never tightened: the relaxation is journaled once, not per interval."""
    policy = rig.policy(relax_clip_after_seconds=100)
    policy.tick(0.0, [spike(0.0)])
    assert [o.result for o in policy.tick(150.0, [])] == ["noop"]
    assert policy.tick(300.0, []) == []
    assert not (rig.tmp / "run" / "control").exists()


def test_policy_config_rejects_retention_shorter_than_its_windows() -> None:
    """A journal retention shorter than the policy's own windows would forget budgets: rejected."""
    problems = PolicyConfig(journal_retention_seconds=60).problems()
    assert [key for key, _ in problems] == ["journal_retention_seconds", "budget_window_seconds"]
