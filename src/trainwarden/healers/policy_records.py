"""The policy's journaling half: act, give up, alert or refuse, each written to the journal once.

A mixin of `Policy` (its attributes are set by `Policy.__init__`), split out so the policy module
holds the decision and this one what a decision leaves behind: journal entries, incident bundles,
alerts and the counters the exporter reads.
"""

from __future__ import annotations

import logging

from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer
from trainwarden.healers.policy_findings import NO_HEALER, Outcome, parse_subject, scope_of
from trainwarden.healers.policy_metrics import (
    ACTIONS,
    ACTIONS_ENABLED,
    BREAKER_OPEN,
    JOURNAL_ERRORS,
    REFUSALS,
)
from trainwarden.incidents import IncidentWriter
from trainwarden.journal import Decision, Entry, Journal, JournalError
from trainwarden.model import Finding, Sample
from trainwarden.policy_config import PolicyConfig
from trainwarden.store import Point, Store

log = logging.getLogger("trainwarden.healers.policy")  # one logger name for the whole policy

SOURCE = "policy"
EVIDENCE_WINDOW_SECONDS = 300.0


class PolicyRecords:
    """Journaling, alerting and bookkeeping of a policy."""

    config: PolicyConfig
    _healers: dict[str, Healer]
    _journal: Journal
    _store: Store | None
    _incidents: IncidentWriter | None
    _dry_run: bool
    _actions: dict[tuple[str, str], int]
    _refusals: dict[str, int]
    _journal_errors: int
    _open: set[tuple[str, str]]
    _next_prune: float

    def _act(self, finding: Finding, key: str, healer: Healer, action: Action, now: float) -> Outcome:
        entry_id = self._journal.record(
            time=now,
            rule=finding.rule,
            subject=finding.subject_key,
            finding_key=key,
            healer=action.healer,
            action_key=action.key,
            decision=Decision.TAKEN,
            result="pending",
            dry_run=self._dry_run,
            reason=action.reason,
            evidence=finding.evidence,
        )
        result = _apply(healer, action, dry_run=self._dry_run)
        incident = ""
        if self._incidents is not None and result.outcome is not ActionOutcome.DRY_RUN:
            try:
                incident = str(
                    self._incidents.write(finding, action, result, self._windows(finding, now), now)
                )
            except OSError as exc:
                log.warning("policy: cannot write incident bundle for %s: %s", action.key, exc)
        self._journal.finish(
            entry_id, result=result.outcome.value, detail=result.detail, time=now, incident=incident
        )
        self._count(action.healer, result.outcome.value)
        log.info("policy: %s %s -> %s: %s", action.healer, key, result.outcome.value, result.detail)
        if result.outcome is ActionOutcome.FAILED:
            self._alert(finding, key, f"failed:{action.key}", f"{action.healer} failed: {result.detail}", now)
        return Outcome(
            finding, Decision.TAKEN, result.outcome.value, action.healer, result.detail, action.key
        )

    def _give_up(
        self, finding: Finding, key: str, ladder: tuple[str, ...], attempts: int, now: float, *, why: str = ""
    ) -> Outcome:
        detail = (f"{why}; " if why else "") + (
            f"ladder {' -> '.join(ladder)} exhausted after {attempts} attempt(s) in "
            f"{self.config.budget_window_seconds:.0f}s; alerting instead of acting again"
        )
        self._journal.record(
            time=now,
            rule=finding.rule,
            subject=finding.subject_key,
            finding_key=key,
            healer=NO_HEALER,
            decision=Decision.GAVE_UP,
            result="gave_up",
            dry_run=self._dry_run,
            reason=finding.summary,
            detail=detail,
            evidence=finding.evidence,
        )
        self._count(NO_HEALER, "gave_up")
        self._refusals["gave_up"] = self._refusals.get("gave_up", 0) + 1
        log.warning("policy: giving up on %s: %s", key, detail)
        self._alert(finding, key, "gave_up", f"gave up: {detail}", now)
        return Outcome(finding, Decision.GAVE_UP, "gave_up", NO_HEALER, detail)

    def _alert(self, finding: Finding, key: str, kind: str, why: str, now: float) -> None:
        for name in self.config.alert_healers:
            healer = self._healers.get(name)
            if healer is None:
                continue
            action = Action(
                healer=name,
                key=f"{key}|alert|{name}|{kind}",
                reason=f"{finding.summary} ({why})",
                subject=dict(finding.subject),
                params={"rule": finding.rule, "severity": finding.severity.value, "alert": True},
                evidence=dict(finding.evidence),
            )
            if self._journal.by_action_key(action.key) is not None:
                continue
            result = _apply(healer, action, dry_run=self._dry_run)
            self._journal.record(
                time=now,
                rule=finding.rule,
                subject=finding.subject_key,
                finding_key=key,
                healer=name,
                action_key=action.key,
                decision=Decision.ALERTED,
                result=result.outcome.value,
                dry_run=self._dry_run,
                reason=why,
                detail=result.detail,
            )
            self._count(name, "alerted")

    def _refuse_once(
        self,
        finding: Finding,
        key: str,
        history: list[Entry],
        *,
        healer: str,
        decision: str,
        reason: str,
        now: float,
        detail: str = "",
    ) -> Outcome | None:
        """Journal a refusal the first time it applies to this finding key, not on every tick."""
        if any(e.finding_key == key and e.result == reason for e in history):
            return None
        detail = detail or _REFUSAL_TEXT[reason].format(healer=healer, cfg=self.config)
        self._journal.record(
            time=now,
            rule=finding.rule,
            subject=finding.subject_key,
            finding_key=key,
            healer=healer,
            decision=decision,
            result=reason,
            dry_run=self._dry_run,
            reason=finding.summary,
            detail=detail,
            evidence=finding.evidence,
        )
        self._count(healer, "refused")
        self._refusals[reason] = self._refusals.get(reason, 0) + 1
        log.info("policy: %s on %s: %s", reason, key, detail)
        return Outcome(finding, decision, reason, healer, detail)

    def _prune(self, now: float) -> None:
        """Drop journal entries past the retention, at most once an hour."""
        if now < self._next_prune:
            return
        self._next_prune = now + 3600.0
        try:
            gone = self._journal.prune(now - self.config.journal_retention_seconds)
        except JournalError:
            self._journal_errors += 1
            log.exception("policy: cannot prune the journal")
            return
        if gone:
            log.info("policy: pruned %d journal entries older than the retention", gone)

    def _update_breakers(self, history: list[Entry], now: float) -> None:
        """A breaker is open after `breaker_failures` consecutive failures of one healer on one scope.

        Per scope (a job, or the node), so failures on a job this daemon cannot act on (a job it
        does not supervise) never stop it healing the job it does; dry runs change nothing and
        never count, whatever they report.
        """
        streaks: dict[tuple[str, str], list[Entry]] = {}
        for entry in history:
            if entry.decision == Decision.TAKEN and not entry.dry_run and entry.result != "pending":
                streaks.setdefault((entry.healer, scope_of(parse_subject(entry.subject))), []).append(entry)
        opened: set[tuple[str, str]] = set()
        for where, results in streaks.items():
            streak = 0
            for entry in reversed(results):
                if entry.result != ActionOutcome.FAILED.value:
                    break
                streak += 1
            recent = now - results[-1].time < self.config.breaker_open_seconds
            if streak >= self.config.breaker_failures and recent:
                opened.add(where)
                if where not in self._open:
                    log.warning("policy: circuit breaker of %s on %s open after %d failures", *where, streak)
        self._open = opened

    def _windows(self, finding: Finding, now: float) -> dict[str, list[Point]]:
        """Recent history of every windowed series that belongs to the finding's subject."""
        if self._store is None:
            return {}
        wanted = set(finding.subject.items())
        out: dict[str, list[Point]] = {}
        for series in self._store.latest():
            if series.spec.window and wanted <= set(series.labels):
                label_text = ",".join(f"{k}={v}" for k, v in series.labels)
                points = self._store.window(series.name, series.labels, since=now - EVIDENCE_WINDOW_SECONDS)
                out[f"{series.name}{{{label_text}}}"] = points
        return out

    def _count(self, healer: str, result: str) -> None:
        self._actions[healer, result] = self._actions.get((healer, result), 0) + 1

    def _publish(self, now: float) -> None:
        if self._store is None:
            return
        samples: list[Sample] = [ACTIONS_ENABLED.sample(0.0 if self._dry_run else 1.0)]
        for name in self._healers:
            for result in ("applied", "failed"):
                self._actions.setdefault((name, result), 0)  # zero series exist before the first action
        samples.extend(
            ACTIONS.sample(count, healer=healer, result=result)
            for (healer, result), count in self._actions.items()
        )
        samples.extend(REFUSALS.sample(count, reason=reason) for reason, count in self._refusals.items())
        open_healers = {name for name, _ in self._open}
        samples.extend(
            BREAKER_OPEN.sample(float(name in open_healers), healer=name) for name in self._healers
        )
        samples.append(JOURNAL_ERRORS.sample(self._journal_errors))
        self._store.replace(SOURCE, samples, now)


_REFUSAL_TEXT = {
    "no_route": "no healer routed for this rule; observed only",
    "cooldown": "{healer} acted on this subject less than {cfg.cooldown_seconds:.0f}s ago",
    "budget": "global budget of {cfg.max_actions_per_window} actions"
    " per {cfg.budget_window_seconds:.0f}s is spent",
    "healer_disabled": "healer {healer} is disabled in the config",
    "in_progress": "{healer} is already acting on this incident",
    "circuit_open": "circuit breaker of {healer} is open after {cfg.breaker_failures} consecutive failures",
}


def _apply(healer: Healer, action: Action, *, dry_run: bool) -> ActionResult:
    """Run a healer; an exception is a failed action, never a crashed daemon."""
    try:
        return healer.apply(action, dry_run=dry_run)
    except Exception as exc:
        log.exception("healer %s raised on %s", healer.name, action.key)
        return ActionResult(ActionOutcome.FAILED, f"healer raised {type(exc).__name__}: {exc}")
