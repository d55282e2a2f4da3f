"""Detect-and-heal inside the daemon: the rule engine, the policy and the healers on a scheduler job.

Every `interval_seconds` the tick evaluates the rules over the store, hands firing findings to
the policy (which journals and maybe acts), publishes each healer's own metrics (any healer with
a `samples()` method) and turns what happened into timeline events. It runs as one of the
scheduler's extra jobs, on a thread of its own, so a healer waiting for a checkpoint delays only
the next tick (APScheduler skips overlapping runs), never the collectors.

`trainwarden run` lends the policy its supervised child (`restart_backend`) and feeds it findings
of its own (`decide`): a child that exited non-zero is a `process_exit` finding at once, not only
when the process-gone rule notices.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainwarden.backends.base import RankProcess, RestartBackend
from trainwarden.backends.comeback import RestartWatch, last_step_at, options_from
from trainwarden.daemon.scheduler import ExtraJob
from trainwarden.daemon.timeline import EventKind, EventSink, TimelineEvent, emit
from trainwarden.healers import healer_classes
from trainwarden.healers.base import Healer, HealerContext
from trainwarden.healers.policy import Outcome, Policy, finding_key
from trainwarden.incidents import IncidentWriter
from trainwarden.journal import Decision, Journal, JournalError
from trainwarden.model import Finding, FindingState, MetricSpec, Sample
from trainwarden.rules.engine import RuleEngine
from trainwarden.store import Store

if TYPE_CHECKING:
    from trainwarden.config import Config
    from trainwarden.daemon.host import DaemonHost

log = logging.getLogger(__name__)

SOURCE = "healers"
TICK_SECONDS = 1.0
FINDINGS_ACTIVE = MetricSpec(
    "trainwarden_findings_active",
    "Findings firing now, by rule and severity (a pair once seen stays, at 0, when they resolve).",
    labelnames=("rule", "severity"),
)


class CollectorJobs:
    """The training collector of the daemon's current runtime, looked up on each call (reload-safe)."""

    def __init__(self, collectors: Callable[[], Sequence[Any]], store: Store | None = None) -> None:
        self._collectors = collectors
        self._store = store

    def _training(self) -> Any | None:
        return next((c for c in self._collectors() if c.name == "training"), None)

    def processes(self, job: str) -> Sequence[RankProcess]:
        """Local ranks of `job` from the training socket's hellos."""
        training = self._training()
        return [] if training is None else list(training.processes(job))

    def forget(self, job: str) -> None:
        """Drop `job`'s ranks and its series' history after a restart.

        Evidence from before the restart (a NaN, a spike) says nothing about the resumed run, and
        would otherwise keep its finding firing into a second, needless restart.
        """
        training = self._training()
        if training is not None:
            training.forget(job)
        if self._store is not None:
            self._store.drop_windows(job=job)


@dataclass(frozen=True)
class HealingParts:
    """The healers, engine and policy one configuration asks for, built before a reload swaps them in."""

    config: Config
    healers: Mapping[str, Healer]
    engine: RuleEngine
    policy: Policy


class Healing:
    """Owns the engine, the policy and the healers of one daemon."""

    def __init__(
        self,
        daemon: DaemonHost,
        *,
        restart_backend: RestartBackend | None = None,
        on_event: EventSink | None = None,
        interval_seconds: float = TICK_SECONDS,
    ) -> None:
        config = daemon.config
        self.clock = daemon.clock
        self.store = daemon.store
        self.on_event = on_event
        self.interval_seconds = interval_seconds
        self.restart_backend = restart_backend
        self.context = HealerContext(
            runtime_dir=config.daemon.runtime_dir,
            state_dir=config.daemon.state_dir,
            clock=daemon.clock,
            store=daemon.store,
            jobs=CollectorJobs(daemon.current_collectors, daemon.store),
            restart_backend=restart_backend,
        )
        self.journal = Journal.in_state_dir(config.daemon.state_dir)
        self._config = config
        self.healers: dict[str, Healer] = self._build_healers(config)
        self.engine = RuleEngine.from_config(config, daemon.store)
        self.policy = self._build_policy(config, self.healers)
        self._firing: set[str] = set()
        self._lock = threading.Lock()
        self._severities_seen: set[tuple[str, str]] = set()
        self.restarts = RestartWatch()  # every applied restart must be answered by a step
        # Told of every outcome after its healer ran, with the decision time (goodput accounting).
        self.outcome_listeners: list[Callable[[Outcome, float], None]] = []

    def install(self, daemon: DaemonHost) -> None:
        """Add the tick to the daemon's scheduler jobs and the engine/policy state to /status."""
        daemon.extra_jobs.append(ExtraJob("detect-and-heal", self.tick, self.interval_seconds))
        # Looked up per call, not bound once: a reload swaps the engine and the policy.
        daemon.status_sections["rules"] = lambda: self.engine.status()  # noqa: PLW0108
        daemon.status_sections["policy"] = lambda: self.policy.status()  # noqa: PLW0108
        daemon.status_sections["restarts"] = self.restarts.status

    # --- reload -----------------------------------------------------------------------------

    def prepare(self, config: Config) -> HealingParts:
        """Build what `config` asks for without touching the running parts; raises if it cannot.

        Parts whose sections did not change are reused, so a reload that only retunes a collector
        keeps the engine's pending findings and the healers' state.
        """
        current = self._config
        healers_same = config.plugins.get("healers") == current.plugins.get("healers")
        healers = self.healers if healers_same else self._build_healers(config)
        policy_same = healers_same and config.policy == current.policy
        if policy_same:
            policy = self.policy
        else:
            policy = self._build_policy(config, healers)
            policy.carry_counters(self.policy)
        rules_same = config.plugins.get("rules") == current.plugins.get("rules")
        engine = self.engine if rules_same else RuleEngine.from_config(config, self.store)
        return HealingParts(config, healers, engine, policy)

    def parts(self) -> HealingParts:
        """The running parts, to put back if a reload fails after `apply`."""
        return HealingParts(self._config, dict(self.healers), self.engine, self.policy)

    def apply(self, parts: HealingParts) -> None:
        """Swap in prepared parts; the next tick (and `decide`) uses them, a running tick finishes on the old.

        The policy goes first: an operator turning actions off is obeyed from the next decision on.
        """
        with self._lock:
            self.policy = parts.policy
            self.healers = dict(parts.healers)
            if parts.engine is not self.engine:
                self._firing.clear()  # a new engine starts without findings; their events start over
            self.engine = parts.engine
            self._config = parts.config

    def ladder_for(self, finding: Finding) -> tuple[str, ...]:
        """The current policy's ladder for `finding` (reload-safe, unlike a bound method of one policy)."""
        return self.policy.ladder_for(finding)

    def _build_healers(self, config: Config) -> dict[str, Healer]:
        options = config.plugins.get("healers", {})
        healers: dict[str, Healer] = {}
        for name, healer_cls in healer_classes().items():
            healer_options = options.get(name) or healer_cls.Options()
            if healer_options.enabled:
                healers[name] = healer_cls(healer_options, self.context)
        return healers

    def _build_policy(self, config: Config, healers: Mapping[str, Healer]) -> Policy:
        return Policy(
            config.policy,
            healers,
            self.journal,
            registered=healer_classes(),
            store=self.store,
            incidents=IncidentWriter(config.daemon.state_dir),
        )

    def tick(self) -> list[Outcome]:
        """One round: rules, then the policy on what fires; returns the policy's outcomes."""
        now = self.clock()
        findings = self.engine.tick(now)
        findings += self.restarts.check(now, partial(last_step_at, self.store, self.context.jobs))
        self._finding_events(findings)
        return self.decide(findings, now, complete=True)

    def decide(
        self, findings: Sequence[Finding], now: float | None = None, *, complete: bool = False
    ) -> list[Outcome]:
        """Hand findings (from the engine, the supervisor or the webhook) to the policy; publish and report.

        `complete` only for the engine's tick, which holds every active finding (see `Policy.tick`).
        """
        now = self.clock() if now is None else now
        outcomes = self.policy.tick(now, findings, complete=complete)
        for outcome in outcomes:
            if outcome.action_key is not None:
                self._attach_stacks(outcome.action_key)
                job = outcome.finding.subject.get("job", "")
                if job and outcome.healer == "checkpoint_restart" and outcome.result == "applied":
                    self.restarts.options = options_from(self.healers.get(outcome.healer))
                    self.restarts.expect(job, now, action_key=outcome.action_key, healer=outcome.healer)
            emit(self.on_event, outcome_event(outcome, now))
            for listener in self.outcome_listeners:
                try:
                    listener(outcome, now)
                except Exception:
                    log.exception("an outcome listener failed")
        self._publish(now)
        return outcomes

    def _attach_stacks(self, action_key: str) -> None:
        """Copy the stacks a restart captured into the action's incident bundle (written after apply)."""
        try:
            entry = self.journal.by_action_key(action_key)
            if entry is None or not entry.incident:
                return
            bundle = Path(entry.incident)
            result = json.loads((bundle / "result.json").read_text(encoding="utf-8"))
            folder = result.get("data", {}).get("stacks_dir")
            if not folder:
                return
            for path in sorted(Path(folder).glob("rank*.txt")):
                IncidentWriter.add_file(bundle, f"stacks-{path.name}", path.read_text(encoding="utf-8"))
        except (OSError, ValueError, JournalError) as exc:
            log.warning("cannot attach stacks to the incident of %s: %s", action_key, exc)

    def _finding_events(self, findings: Sequence[Finding]) -> None:
        with self._lock:
            for finding in findings:
                key = f"{finding.rule}|{finding.subject_key}"
                if finding.state is FindingState.FIRING and key not in self._firing:
                    self._firing.add(key)
                    emit(self.on_event, finding_event(EventKind.FINDING_FIRED, finding))
                elif finding.state is FindingState.RESOLVED and key in self._firing:
                    self._firing.discard(key)
                    emit(self.on_event, finding_event(EventKind.FINDING_RESOLVED, finding))

    def _publish(self, now: float) -> None:
        samples: list[Sample] = []
        for healer in self.healers.values():
            method = getattr(healer, "samples", None)
            if callable(method):
                try:
                    samples.extend(method())
                except Exception:
                    log.exception("healer %s: samples() failed", healer.name)
        if self.restart_backend is not None:
            samples.extend(self.restart_backend.samples())
        samples.extend(findings_active_samples(self.engine.active(), self._severities_seen))
        self.store.replace(SOURCE, samples, now)


def findings_active_samples(active: Sequence[Finding], seen: set[tuple[str, str]]) -> list[Sample]:
    """`trainwarden_findings_active{rule,severity}`: firing findings counted; `seen` keeps zeros."""
    counts: dict[tuple[str, str], int] = {}
    for finding in active:
        if finding.state is FindingState.FIRING:
            key = (finding.rule, finding.severity.value)
            counts[key] = counts.get(key, 0) + 1
    seen.update(counts)
    return [FINDINGS_ACTIVE.sample(counts.get(key, 0), rule=key[0], severity=key[1]) for key in sorted(seen)]


def finding_event(kind: EventKind, finding: Finding) -> TimelineEvent:
    """A finding as a timeline event."""
    verb = "fired" if kind is EventKind.FINDING_FIRED else "resolved"
    return TimelineEvent(
        kind,
        f"{finding.rule} {verb} on {finding.subject_key}: {finding.summary}",
        job=finding.subject.get("job", ""),
        rule=finding.rule,
        data={k: v for k, v in finding.evidence.items() if isinstance(v, str | float | int)},
    )


def outcome_event(outcome: Outcome, now: float) -> TimelineEvent:
    """A policy outcome as a timeline event."""
    finding = outcome.finding
    if outcome.decision == Decision.GAVE_UP:
        kind = EventKind.GAVE_UP
    elif outcome.decision != Decision.TAKEN or outcome.result == "dry_run":
        kind = EventKind.ACTION_DECIDED
    elif outcome.result == "failed":
        kind = EventKind.ACTION_FAILED
    else:
        kind = EventKind.ACTION_APPLIED
    return TimelineEvent(
        kind,
        f"{outcome.healer} {outcome.result} for {finding.rule} on {finding.subject_key}: {outcome.detail}",
        time=now,
        job=finding.subject.get("job", ""),
        rule=finding.rule,
        healer=outcome.healer,
        data={"decision": outcome.decision, "result": outcome.result, "finding": finding_key(finding)},
    )
