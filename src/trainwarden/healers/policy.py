"""The policy: decides whether a firing finding becomes an action, and which one.

For each firing finding it classifies the interruption (transient: retry in place; persistent:
the node or GPU is bad; planned: checkpoint and exit), picks the escalation ladder (a route for
the rule, else the ladder of the class), and walks it. One fault gets one action: a finding
observed before the latest action on its job (or the node) took effect (`Healer.took_effect`)
belongs to that action. Evidence observed after it (the same finding persisting, or the same
rule again within `recurrence_seconds`) means the action did not work: the rung is retried up to
`attempts_per_rung` tries, then the ladder climbed, and past the last rung the policy gives up
and alerts instead of looping; the journal says why. Around that: a cooldown per action kind
(healer and rule) and job, a global budget, a circuit breaker per healer and job (consecutive
real failures; dry runs never count), an action key never applied twice, and observe-only mode
unless enabled.

Over 450 lines on purpose: `_decide` and `_plan` are one gate after another, and read in order
only in one place; journaling and bookkeeping live in `policy_records`, pure helpers in
`policy_findings`, the series in `policy_metrics`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from trainwarden.config import Config
from trainwarden.errors import ConfigError
from trainwarden.healers import healer_classes
from trainwarden.healers.base import Action, ActionOutcome, Healer, HealerContext
from trainwarden.healers.policy_findings import (
    FAULT_FAMILIES,
    NO_HEALER,
    Outcome,
    classify,
    fault_family,
    finding_key,
    observed_at,
    parse_subject,
    scope_of,
    validate_healer_names,
)
from trainwarden.healers.policy_metrics import (
    ACTIONS,
    ACTIONS_ENABLED,
    BREAKER_OPEN,
    HEALER_RESULTS,
    JOURNAL_ERRORS,
    REFUSALS,
)
from trainwarden.healers.policy_records import EVIDENCE_WINDOW_SECONDS, SOURCE, PolicyRecords
from trainwarden.healers.rollback import RollbackHealer
from trainwarden.incidents import IncidentWriter
from trainwarden.journal import Decision, Entry, Journal, JournalError
from trainwarden.model import Finding, FindingState, Severity
from trainwarden.policy_config import PolicyConfig
from trainwarden.store import Store

# The policy's public names, wherever they live since the split (old imports keep working).
__all__ = [
    "ACTIONS",
    "ACTIONS_ENABLED",
    "BREAKER_OPEN",
    "CLIP",
    "EVIDENCE_WINDOW_SECONDS",
    "FAULT_FAMILIES",
    "HEALER_RESULTS",
    "JOURNAL_ERRORS",
    "NO_HEALER",
    "REFUSALS",
    "RELAX_RULE",
    "SOURCE",
    "Outcome",
    "Policy",
    "classify",
    "fault_family",
    "finding_key",
    "observed_at",
    "parse_subject",
    "scope_of",
    "validate_healer_names",
]

log = logging.getLogger(__name__)

CLIP = "clip"
RELAX_RULE = "clip_relax"
ROLLBACK = "rollback"


class Policy(PolicyRecords):
    """Turns firing findings into journaled decisions; call `tick(now, findings)` each engine tick."""

    def __init__(
        self,
        config: PolicyConfig,
        healers: Mapping[str, Healer],
        journal: Journal,
        *,
        registered: Iterable[str] | None = None,
        store: Store | None = None,
        incidents: IncidentWriter | None = None,
    ) -> None:
        known = set(registered if registered is not None else healers)
        problems = validate_healer_names(config, known)
        if problems:
            raise ConfigError(problems, "policy")
        self.config = config
        self._healers = dict(healers)
        self._journal = journal
        self._store = store
        self._incidents = incidents
        self._routes = _only_known(config.effective_routes(), config.routes, known)
        self._ladders = _only_known(config.effective_ladders(), config.ladders, known)
        self._dry_run = not config.actions_enabled
        self._actions: dict[tuple[str, str], int] = {}
        self._refusals: dict[str, int] = {}
        self._journal_errors = 0
        self._open: set[tuple[str, str]] = set()  # (healer, scope) whose circuit breaker is open
        self._lock = threading.Lock()  # the scheduler and the Alertmanager webhook may both call tick
        self._next_prune = 0.0

    @classmethod
    def from_config(
        cls, config: Config, store: Store | None = None, context: HealerContext | None = None
    ) -> Policy:
        """Every registered, enabled healer with its options; journal and incidents in the state dir."""
        state_dir = config.daemon.state_dir
        context = context or HealerContext(runtime_dir=config.daemon.runtime_dir, state_dir=state_dir)
        options = config.plugins.get("healers", {})
        healers: dict[str, Healer] = {}
        for name, healer_cls in healer_classes().items():
            healer_options = options.get(name) or healer_cls.Options()
            if healer_options.enabled:
                healers[name] = healer_cls(healer_options, context)
        return cls(
            config.policy,
            healers,
            Journal.in_state_dir(state_dir),
            registered=healer_classes(),
            store=store,
            incidents=IncidentWriter(state_dir),
        )

    @property
    def dry_run(self) -> bool:
        """True in observe-only mode."""
        return self._dry_run

    def ladder_for(self, finding: Finding) -> tuple[str, ...]:
        """The escalation ladder a finding walks."""
        route = self._routes.get(finding.rule)
        if route is not None:
            return route
        return self._ladders.get(classify(finding, self.config.classes), ())

    def tick(self, now: float, findings: Sequence[Finding], *, complete: bool = True) -> list[Outcome]:
        """Decide on every firing finding; resolved and pending ones are only logged by the engine.

        `complete` says `findings` is every finding active now (the rule engine's tick). A partial
        batch (a child's exit, an Alertmanager delivery) is decided on, but cannot show that a job
        has stopped spiking, so it never relaxes clipping.
        Thread-safe (one tick at a time); healers run inside the tick, so a slow healer delays the next.
        """
        with self._lock:
            return self._tick(now, findings, complete=complete)

    def _tick(self, now: float, findings: Sequence[Finding], *, complete: bool) -> list[Outcome]:
        outcomes: list[Outcome] = []
        horizon = self.config.horizon_seconds()
        try:
            history = self._journal.since(now - horizon)
        except JournalError:
            self._journal_errors += 1
            log.exception("policy: journal unreadable; not acting this tick")
            self._publish(now)
            return outcomes
        self._update_breakers(history, now)
        self._prune(now)
        seen: set[str] = set()
        for finding in findings:
            key = finding_key(finding)
            if finding.state is not FindingState.FIRING or key in seen:
                continue  # one decision per finding key per tick, however often it was delivered
            seen.add(key)
            try:
                outcome = self._decide(finding, key, history, now)
            except JournalError:
                self._journal_errors += 1
                log.exception("policy: cannot journal a decision on %s; not acting", key)
                continue
            if outcome is None:
                continue
            outcomes.append(outcome)
            try:
                history = self._journal.since(now - horizon)
            except JournalError:
                self._journal_errors += 1
                log.exception("policy: journal unreadable; not acting further this tick")
                break
        else:
            try:
                if complete:
                    outcomes.extend(self._relax_clipping(findings, history, now))
            except JournalError:
                self._journal_errors += 1
                log.exception("policy: cannot journal a clipping relaxation")
        self._publish(now)
        return outcomes

    def _relax_clipping(self, findings: Sequence[Finding], history: list[Entry], now: float) -> list[Outcome]:
        """Step clipping back toward its defaults once a job has had no spike for a while.

        One relax step per `relax_clip_after_seconds` after the last clip action, repeated while
        each step still changes something; a dry run shows one step and stops there.
        """
        after = self.config.relax_clip_after_seconds
        healer = self._healers.get(CLIP)
        if after <= 0 or healer is None:
            return []
        spiking = {
            f.subject.get("job")
            for f in findings
            if f.state is FindingState.FIRING and CLIP in self.ladder_for(f)
        }
        last: dict[str, Entry] = {}
        for entry in history:
            if entry.healer == CLIP and entry.decision == Decision.TAKEN and entry.dry_run == self._dry_run:
                job = parse_subject(entry.subject).get("job")
                if job:
                    last[job] = entry
        outcomes = []
        for job, entry in sorted(last.items()):
            if job in spiking or now - entry.time < after or entry.result == "pending":
                continue
            if entry.rule == RELAX_RULE and entry.result != ActionOutcome.APPLIED.value:
                continue  # back at the default, failed, or a dry run already showed the step
            finding = Finding(
                RELAX_RULE,
                {"job": job},
                Severity.INFO,
                f"job {job}: no spike for {now - entry.time:.0f}s; relaxing clipping one step",
                since=now,
            )
            key = finding_key(finding)
            action = Action(
                CLIP,
                key=f"{key}|{CLIP}|relax",
                reason=finding.summary,
                subject={"job": job},
                params={"rule": RELAX_RULE, "direction": "relax"},
            )
            outcomes.append(self._act(finding, key, healer, action, now))
        return outcomes

    # --- the decision ---------------------------------------------------------------------

    def _decide(self, finding: Finding, key: str, history: list[Entry], now: float) -> Outcome | None:  # noqa: C901, PLR0911 - one return per gate, in order
        config = self.config
        ladder = self.ladder_for(finding)
        if not ladder:
            return self._refuse_once(
                finding,
                key,
                history,
                healer=NO_HEALER,
                decision=Decision.OBSERVED,
                reason="no_route",
                now=now,
            )
        # Findings on the same scope (job, or the node) that walk the same ladder are one incident:
        # a hung job fires stall and collective_stuck on every rank, and must be restarted once.
        scope = scope_of(finding.subject)
        window_start = now - config.budget_window_seconds
        incident = [
            e
            for e in history
            if e.dry_run == self._dry_run
            and e.time >= window_start
            and e.decision == Decision.TAKEN
            and scope_of(parse_subject(e.subject)) == scope
            and self._ladder_of_entry(e) == ladder
        ]
        if any(
            e.decision == Decision.GAVE_UP
            and e.dry_run == self._dry_run
            and e.time >= window_start
            and scope_of(parse_subject(e.subject)) == scope
            and self._ladder_of_entry(e) == ladder
            for e in history
        ):
            # already gave up on this job's ladder in this window, and alerted: a crash seen again
            # by another rule (process_exit after process_gone) must not start it over
            return None
        plan = self._plan(finding, key, incident, ladder, now)
        if plan is None:
            return None  # one action per episode: nothing new since the last one took effect
        if isinstance(plan, str):
            return self._refuse_once(
                finding,
                key,
                history,
                healer=incident[-1].healer,
                decision=Decision.REFUSED,
                reason="in_progress",
                now=now,
                detail=plan,
            )
        rung, why = plan
        healed = self._healed_by_job(finding)
        if healed:
            # the job's own check (Snapshotter: a NaN, or a loss spike with SpikeCheck) undid the
            # fault after its newest bad point: clipping, a second rollback or a restart would only
            # change a healed run
            return self._refuse_once(
                finding,
                key,
                history,
                healer=ROLLBACK,
                decision=Decision.OBSERVED,
                reason="healed_by_job",
                now=now,
                detail=healed,
            )
        waiting = self._job_first(finding)
        if waiting:
            # a job with its own spike check rolls back at its next boundary: let it, then look again
            return self._refuse_once(
                finding,
                key,
                history,
                healer=ROLLBACK,
                decision=Decision.OBSERVED,
                reason="job_first",
                now=now,
                detail=waiting,
            )
        rung = self._first_able(ladder, rung, finding)
        if rung >= len(ladder):
            return self._give_up(finding, key, ladder, len(incident), now, why=why)
        healer_name = ladder[rung]
        kind = [
            e
            for e in incident
            if e.healer == healer_name and e.rule == finding.rule and now - e.time < config.cooldown_seconds
        ]
        if kind and not why:
            return self._refuse_once(
                finding,
                key,
                history,
                healer=healer_name,
                decision=Decision.REFUSED,
                reason="cooldown",
                now=now,
            )
        everyone = [e for e in history if e.decision == Decision.TAKEN and e.dry_run == self._dry_run]
        if sum(e.time >= window_start for e in everyone) >= config.max_actions_per_window:
            return self._refuse_once(
                finding, key, history, healer=healer_name, decision=Decision.REFUSED, reason="budget", now=now
            )
        healer = self._healers.get(healer_name)
        if healer is None:
            return self._refuse_once(
                finding,
                key,
                history,
                healer=healer_name,
                decision=Decision.REFUSED,
                reason="healer_disabled",
                now=now,
            )
        if (healer_name, scope) in self._open:
            return self._refuse_once(
                finding,
                key,
                history,
                healer=healer_name,
                decision=Decision.REFUSED,
                reason="circuit_open",
                now=now,
            )
        action = self._action(finding, key, healer_name, attempt=len(incident), rung=rung, why=why)
        if self._journal.by_action_key(action.key) is not None:
            return None  # journaled before a crash: never apply an action key twice
        return self._act(finding, key, healer, action, now)

    def _healed_by_job(self, finding: Finding) -> str:
        """Why no action is needed: the job rolled back past the finding's bad step by itself; else ""."""
        return self._ask_rollback("healed_by_job", finding, RollbackHealer.healed_by_job)

    def _job_first(self, finding: Finding) -> str:
        """Why the job gets the first try at this finding (its own rollback); else ""."""
        return self._ask_rollback("waiting_for_job", finding, RollbackHealer.waiting_for_job)

    def _ask_rollback(
        self, name: str, finding: Finding, question: Callable[[RollbackHealer, Finding], str | None]
    ) -> str:
        """The rollback healer's answer to `question` about `finding` ("" without one, or on its error)."""
        healer = self._healers.get(ROLLBACK)
        if not isinstance(healer, RollbackHealer):
            return ""
        try:
            answer = question(healer, finding)
        except Exception:
            log.exception("healer %s: %s failed on %s", ROLLBACK, name, finding_key(finding))
            return ""
        return answer or ""

    def _first_able(self, ladder: tuple[str, ...], rung: int, finding: Finding) -> int:
        """The first rung from `rung` whose healer can act on the subject (a rollback needs the job's say)."""
        while rung < len(ladder):
            healer = self._healers.get(ladder[rung])
            if healer is None or healer.can_act(finding.subject):
                return rung  # an absent healer is refused further on, with its reason journaled
            rung += 1
        return rung

    def _plan(  # noqa: PLR0911 - one return per case, in order
        self, finding: Finding, key: str, incident: list[Entry], ladder: tuple[str, ...], now: float
    ) -> tuple[int, str] | str | None:
        """Which rung a finding gets, and why; a refusal text while an earlier action is under way.

        One action per fault: a finding observed before the incident's latest action took effect
        is that action's business (None when it is the very episode acted on, else a refusal).
        Observed after it: the same episode, or the same rule again within
        `recurrence_seconds`, is evidence that the action did not work: the rung is tried again
        until it had `attempts_per_rung` tries, then the next one (with the reason); anything
        else is a new fault and starts at the bottom.
        """
        if not incident:
            return 0, ""
        observed = observed_at(finding)
        latest = incident[-1]
        effect = self._effect_time(latest, now)
        if effect is None or observed <= effect:
            if any(e.finding_key == key for e in incident):
                return None
            if effect is None:
                return f"{latest.healer} acted on {latest.subject} at {latest.time:.0f}; not in effect yet"
            return f"observed before {latest.healer} (acted at {latest.time:.0f}) took effect"
        family = fault_family(finding.rule)
        same = [e for e in incident if e.finding_key == key or fault_family(e.rule) == family]
        for entry in reversed(same):
            entry_effect = self._effect_time(entry, now)
            if entry_effect is None:
                continue
            later = observed - entry_effect
            persisted = entry.finding_key == key
            if not persisted and later > self.config.recurrence_seconds:
                break  # long after: a new fault, not a failed action
            healer = self._healers.get(entry.healer)
            if not persisted and healer is not None and healer.new_fault(entry.evidence, finding):
                break  # the action removed its fault's cause (a rollback skipped the batch): a new one
            verb = "persisted" if persisted else "recurred"
            evidence = f"{finding.rule} {verb} {later:.0f}s after {entry.healer} took effect"
            rung = ladder.index(entry.healer) if entry.healer in ladder else len(ladder) - 1
            tries = sum(e.healer == entry.healer for e in same)
            if tries < self.config.attempts_per_rung:
                return rung, f"retrying ({tries + 1}/{self.config.attempts_per_rung}): {evidence}"
            return rung + 1, f"escalating: {evidence}"
        return 0, ""

    def _effect_time(self, entry: Entry, now: float) -> float | None:
        """When a journaled action took effect (its healer says), None while pending or not yet.

        An action still not in effect `cooldown_seconds` after it was applied (clipping the job
        never acknowledges, a restart the daemon died during) counts as in effect from then: a
        fault persisting past that bound escalates instead of waiting for ever.
        """
        done = entry.finished if entry.finished is not None else entry.time
        bound = done + self.config.cooldown_seconds
        if entry.result == "pending":  # under way, or the daemon died during it
            return bound if now >= bound else None
        if entry.result != ActionOutcome.APPLIED.value:
            return done  # a failure, a no-op or a dry run changed nothing there is to wait for
        healer = self._healers.get(entry.healer)
        if healer is None:
            return done
        action = Action(
            entry.healer,
            key=entry.action_key or entry.finding_key,
            reason=entry.reason,
            subject=parse_subject(entry.subject),
            params={"rule": entry.rule},
            evidence=dict(entry.evidence),  # e.g. the first bad step a rollback must go back past
        )
        try:
            effect = healer.took_effect(action, done)
        except Exception:
            log.exception("healer %s: took_effect failed on %s", entry.healer, action.key)
            return done
        if effect is None and now >= bound:
            return bound
        return effect

    def _ladder_of_entry(self, entry: Entry) -> tuple[str, ...]:
        if entry.rule == RELAX_RULE:
            return ()  # recovery steps never count toward an escalation
        route = self._routes.get(entry.rule)
        if route is not None:
            return route
        stub = Finding(
            entry.rule,
            {},
            Severity.INFO,
            "",
            evidence={"interruption": str(entry.evidence.get("interruption", ""))},
        )
        return self._ladders.get(classify(stub, self.config.classes), ())

    def _action(
        self, finding: Finding, key: str, healer: str, *, attempt: int, rung: int, why: str = ""
    ) -> Action:
        params: dict[str, str | float | int | bool] = {
            "rule": finding.rule,
            "interruption": classify(finding, self.config.classes),
            "severity": finding.severity.value,
            "rung": rung,
            "attempt": attempt,
        }
        for name in ("step", "first_step", "last_step"):
            value = finding.evidence.get(name)
            if isinstance(value, float | int):
                params[name] = value
        return Action(
            healer=healer,
            key=f"{key}|{healer}|{attempt}",
            reason=f"{why}: {finding.summary}" if why else finding.summary,
            subject=dict(finding.subject),
            params=params,
            evidence=dict(finding.evidence),
        )

    # --- breaker, evidence, metrics --------------------------------------------------------

    def carry_counters(self, previous: Policy) -> None:
        """Continue `previous`'s counters: a reload builds a new policy, and counters must not reset."""
        with previous._lock:
            self._actions = dict(previous._actions)
            self._refusals = dict(previous._refusals)
            self._journal_errors = previous._journal_errors

    def status(self) -> dict[str, object]:
        """JSON-able state for `/status` and `trainwarden status`."""
        with self._lock:
            return {
                "actions_enabled": not self._dry_run,
                "healers": sorted(self._healers),
                "breakers_open": sorted(f"{name} ({scope})" for name, scope in self._open),
                "routes": {rule: list(ladder) for rule, ladder in sorted(self._routes.items())},
                "ladders": {name: list(ladder) for name, ladder in sorted(self._ladders.items())},
                "journal": str(self._journal.path),
                "journal_errors": self._journal_errors,
            }


def _only_known(
    effective: Mapping[str, tuple[str, ...]],
    configured: Mapping[str, tuple[str, ...]],
    known: set[str],
) -> dict[str, tuple[str, ...]]:
    """Drop default rungs whose healer is not installed (configured ones were validated)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, ladder in effective.items():
        if name in configured:
            out[name] = ladder
            continue
        kept = tuple(h for h in ladder if h in known)
        if kept != ladder:
            log.info(
                "policy: default ladder %s skips healers not installed: %s", name, set(ladder) - set(kept)
            )
        out[name] = kept
    return out
