"""A training rank whose process vanished (its /proc entry is gone) without the job finishing.

A rank that said goodbye (`trainwarden_train_exited_cleanly` 1, exported once the training collector
reports clean `bye` records) finished rather than crashed and is not a finding; without that series
every vanished process counts, so a finished job is reported until the collector's retention forgets it.
`observed_at` is the rank's last step: a process that died before a restart took effect is that
restart's business, not a new crash (the policy compares it with when the restart took effect).
"""

from __future__ import annotations

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView
from trainwarden.rules.training import CLEAN_EXIT, LAST_STEP_TS, PID, PROCESS_UP


class ProcessGoneRule(Rule):
    """One finding per rank whose `trainwarden_train_process_up` is 0."""

    name = "process_gone"
    Options = RuleOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Ranks reported down by the training collector."""
        del now
        findings = []
        for series in view.series(PROCESS_UP):
            if series.value != 0.0 or view.value(CLEAN_EXIT, series.labels) == 1.0:
                continue
            labels = dict(series.labels)
            job, rank = labels.get("job", ""), labels.get("rank", "")
            pid = view.value(PID, series.labels)
            evidence: dict[str, float | str] = {"interruption": "transient"}
            if pid is not None:
                evidence["pid"] = pid
            last_step = view.value(LAST_STEP_TS, series.labels)
            if last_step is not None:
                evidence["observed_at"] = last_step
            summary = f"rank {rank} of job {job}: process {int(pid) if pid else '?'} is gone"
            findings.append(self.finding({"job": job, "rank": rank}, summary, evidence, Severity.CRITICAL))
        return findings


RULE = ProcessGoneRule
