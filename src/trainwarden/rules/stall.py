"""Stall / hang of one rank, phase-aware, with timeouts learned from the job's own step times.

A rank is stalled when the time since its last progress exceeds a timeout learned from its own
history: a high quantile of its recent step durations times a safety factor, never below a floor. A
rank inside a checkpoint, eval, data or init phase is judged against that phase's own learned
durations (or a generous default until enough phases were seen), so a long checkpoint never
reads as a hang, and a steady job is caught in tens of seconds instead of NCCL's 10 minutes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView, quantile
from trainwarden.rules.training import (
    CLEAN_EXIT,
    LAST_STEP_TS,
    PHASE_SECONDS,
    PHASE_STARTED_TS,
    PROCESS_UP,
    STEP,
    STEP_PHASE,
    STEP_SECONDS,
    current_phase,
    positive_values,
    rank_labels,
)

_PHASE_DEFAULTS = MappingProxyType({"checkpoint": 1800.0, "eval": 1800.0, "init": 900.0, "data": 600.0})


@dataclass(frozen=True)
class StallOptions(RuleOptions):
    """Learned-timeout parameters.

    `default_timeout_seconds` applies to steps until `min_samples` step durations were seen;
    `phase_default_seconds` per non-step phase until `min_phase_samples` of that phase were seen.
    """

    quantile: float = 0.99
    safety_factor: float = 4.0
    floor_seconds: float = 20.0
    min_samples: int = 20
    default_timeout_seconds: float = 300.0
    phase_floor_seconds: float = 60.0
    min_phase_samples: int = 3
    phase_default_seconds: Mapping[str, float] = field(default_factory=lambda: _PHASE_DEFAULTS)
    resolve_after_seconds: float = 5.0

    def problems(self) -> list[tuple[str, str]]:
        """Quantile in (0, 1], positive factors and timeouts."""
        found = super().problems()
        if not 0 < self.quantile <= 1:
            found.append(("quantile", "must be in (0, 1]"))
        for key in ("safety_factor", "floor_seconds", "default_timeout_seconds", "phase_floor_seconds"):
            if getattr(self, key) <= 0:
                found.append((key, "must be > 0"))
        found.extend(
            (key, "must be >= 1") for key in ("min_samples", "min_phase_samples") if getattr(self, key) < 1
        )
        found.extend(
            (f"phase_default_seconds.{phase}", "must be > 0")
            for phase, seconds in self.phase_default_seconds.items()
            if seconds <= 0
        )
        return found


class StallRule(Rule):
    """A rank that made no progress for longer than its learned timeout."""

    name = "stall"
    Options = StallOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """One finding per stalled rank."""
        options = self.options
        assert isinstance(options, StallOptions)
        ranks: set[tuple[str, str]] = set()
        for name in (LAST_STEP_TS, PHASE_STARTED_TS):
            for series in view.series(name):
                labels = dict(series.labels)
                ranks.add((labels.get("job", ""), labels.get("rank", "")))
        findings = []
        for job, rank in sorted(ranks):
            found = self._check_rank(view, now, options, job, rank)
            if found is not None:
                findings.append(found)
        return findings

    def _check_rank(
        self, view: RuleView, now: float, options: StallOptions, job: str, rank: str
    ) -> Finding | None:
        labels = rank_labels(job, rank)
        if view.value(PROCESS_UP, labels) == 0.0:
            return None  # a vanished process is process_gone's finding, not a stall
        if view.value(CLEAN_EXIT, labels) == 1.0:
            return None  # said goodbye: a finished rank tearing down (torch, torchrun) is not hung
        phase = current_phase(view, job, rank)
        last_step = view.value(LAST_STEP_TS, labels)
        phase_started = view.value(PHASE_STARTED_TS, labels)
        if phase == STEP_PHASE:
            # progress is the later of the last step and the end of the previous phase, so the
            # first step after a long checkpoint is not measured from before the checkpoint
            marks = [t for t in (last_step, phase_started) if t is not None]
            durations = positive_values(view.window(STEP_SECONDS, labels))
            floor, default, minimum = (
                options.floor_seconds,
                options.default_timeout_seconds,
                options.min_samples,
            )
        else:
            marks = [t for t in (phase_started, last_step) if t is not None][:1]
            durations = positive_values(
                view.window(PHASE_SECONDS, tuple(sorted((*labels, ("phase", phase)))))
            )
            floor, minimum = options.phase_floor_seconds, options.min_phase_samples
            default = options.phase_default_seconds.get(phase, options.default_timeout_seconds)
        if not marks:
            return None
        elapsed = now - max(marks)
        if len(durations) >= minimum:
            learned = quantile(durations, options.quantile)
            timeout = max(floor, learned * options.safety_factor)
            source = "learned"
        else:
            learned = float("nan")
            timeout = default
            source = "default"
        if elapsed <= timeout:
            return None
        step = view.value(STEP, labels)
        evidence: dict[str, float | str] = {
            "phase": phase,
            "elapsed_seconds": round(elapsed, 3),
            "timeout_seconds": round(timeout, 3),
            "timeout_source": source,
            "samples": len(durations),
            "learned_quantile_seconds": learned,
            "interruption": "transient",
        }
        if step is not None:
            evidence["last_step"] = step
        summary = (
            f"rank {rank} of job {job} made no progress for {elapsed:.0f}s in phase {phase} "
            f"(timeout {timeout:.0f}s, {source})"
        )
        return self.finding({"job": job, "rank": rank}, summary, evidence, Severity.CRITICAL)


RULE = StallRule
