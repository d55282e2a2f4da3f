"""The series the policy exports: its decisions, refusals, breakers and journal health."""

from __future__ import annotations

from trainwarden.model import MetricKind, MetricSpec

ACTIONS = MetricSpec(
    "trainwarden_actions_total",
    "Policy decisions by healer and result (applied, noop, dry_run, failed, refused, gave_up, alerted).",
    MetricKind.COUNTER,
    ("healer", "result"),
)
REFUSALS = MetricSpec(
    "trainwarden_policy_refusals_total",
    "Findings not acted on, by reason (cooldown, budget, circuit_open, healer_disabled, gave_up, no_route).",
    MetricKind.COUNTER,
    ("reason",),
)
BREAKER_OPEN = MetricSpec(
    "trainwarden_policy_breaker_open",
    "1 while a healer's circuit breaker is open on some job (or the node) after consecutive failures.",
    labelnames=("healer",),
)
ACTIONS_ENABLED = MetricSpec(
    "trainwarden_policy_actions_enabled",
    "1 when the policy may act, 0 in observe-only (dry run) mode.",
)
JOURNAL_ERRORS = MetricSpec(
    "trainwarden_journal_errors_total",
    "Journal reads or writes that failed; the policy does not act without a journal.",
    MetricKind.COUNTER,
)
HEALER_RESULTS = ("applied", "noop", "dry_run", "failed", "refused", "gave_up", "alerted")
