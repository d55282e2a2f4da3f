"""Pure helpers of the policy: what a finding is, whom it concerns, and what the policy made of it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trainwarden.errors import ConfigProblem
from trainwarden.model import Finding
from trainwarden.policy_config import INTERRUPTIONS, PolicyConfig

NO_HEALER = "none"


@dataclass(frozen=True)
class Outcome:
    """What the policy did with one finding at one tick (for logs, tests and the demo timeline)."""

    finding: Finding
    decision: str
    result: str
    healer: str
    detail: str
    action_key: str | None = None


FAULT_FAMILIES = {"process_gone": "process_ended", "process_exit": "process_ended"}
"""Rules that see one fault from two sides: a rank's process gone and the job's command exiting are
the same crash, whichever the daemon noticed first, so they share one count of attempts."""


def fault_family(rule: str) -> str:
    """The fault a rule's finding is evidence of, for counting attempts and recurrences."""
    return FAULT_FAMILIES.get(rule, rule)


def finding_key(finding: Finding) -> str:
    """Identity of one occurrence of a finding: rule, subject and when it started firing."""
    return f"{finding.rule}|{finding.subject_key}|{finding.since:.3f}"


def scope_of(subject: Mapping[str, str]) -> str:
    """What an action on this subject affects: its job, or else the node this daemon runs on."""
    job = subject.get("job")
    return f"job={job}" if job else "node"


def parse_subject(subject_key: str) -> dict[str, str]:
    """The subject dict back from its `k=v,k=v` text (values are bounded label values)."""
    return dict(part.split("=", 1) for part in subject_key.split(",") if "=" in part)


def observed_at(finding: Finding) -> float:
    """When the newest data behind a finding arrived (evidence `observed_at`), else when it began."""
    value = finding.evidence.get("observed_at")
    return float(value) if isinstance(value, float | int) else finding.since


def classify(finding: Finding, classes: Mapping[str, str]) -> str:
    """Interruption class: configured per rule, else what the rule's evidence says, else transient."""
    configured = classes.get(finding.rule)
    if configured in INTERRUPTIONS:
        return configured
    claimed = str(finding.evidence.get("interruption", ""))
    return claimed if claimed in INTERRUPTIONS else "transient"


def validate_healer_names(config: PolicyConfig, registered: Iterable[str]) -> list[ConfigProblem]:
    """Every healer named in the config must be registered (the loader runs the same check)."""
    return config.healer_problems(registered)
