"""What a rule is: a pure function from the store's windows (and the time) to findings.

A rule reads a read-only `RuleView`, gets `now` passed in, and returns the findings it asserts
*now*. It keeps no state, reads no clock and does no I/O; the engine adds `for` durations,
hysteresis and resolution around it, so every rule can be tested on a synthetic store.
A rule is one file defining a `Rule` subclass exposed as module-level `RULE`, registered by one
line in `trainwarden.rules.RULE_MODULES`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from trainwarden.config import PluginOptions
from trainwarden.model import Finding, Labels, Severity
from trainwarden.store import Point, Store, StoredSeries


@dataclass(frozen=True)
class RuleOptions(PluginOptions):
    """Options every rule has.

    `for_seconds`: how long a condition must hold before the finding fires (pending until then).
    `resolve_after_seconds`: how long a firing finding stays active once no longer asserted, so a
    flapping condition does not fire and resolve on every tick.
    """

    for_seconds: float = 0.0
    resolve_after_seconds: float = 30.0

    def problems(self) -> list[tuple[str, str]]:
        """Durations cannot be negative."""
        found = super().problems()
        if self.for_seconds < 0:
            found.append(("for_seconds", "must be >= 0"))
        if self.resolve_after_seconds < 0:
            found.append(("resolve_after_seconds", "must be >= 0"))
        return found


class RuleView:
    """Read-only access to the store for rules, plus the previous tick's values and active findings.

    Rules get snapshots (lists, never live structures). `previous` holds the latest values seen
    at the engine's previous tick, so a rule can compute a counter's increase without keeping
    state of its own.
    """

    def __init__(
        self,
        store: Store,
        previous: Mapping[tuple[str, Labels], float] | None = None,
        active: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self._store = store
        self._previous = dict(previous or {})
        self._active = dict(active or {})

    def series(self, name: str) -> list[StoredSeries]:
        """Every current series with this sample name."""
        return self._store.find(name)

    def value(self, name: str, labels: Labels) -> float | None:
        """Latest value of one series, or None."""
        return self._store.value(name, **dict(labels))

    def window(self, name: str, labels: Labels, since: float | None = None) -> list[Point]:
        """History of one windowed series, oldest first."""
        return self._store.window(name, labels, since)

    def windows(self, name: str) -> list[tuple[Labels, list[Point]]]:
        """Every windowed series with this name and its history."""
        return list(self._store.windows(name))

    def previous(self, name: str, labels: Labels) -> float | None:
        """The value this series had at the previous engine tick, or None if it was absent."""
        return self._previous.get((name, labels))

    def active_subjects(self, rule: str) -> frozenset[str]:
        """Subject keys of `rule`'s findings currently pending or firing (for rule-level hysteresis)."""
        return self._active.get(rule, frozenset())


class Rule(abc.ABC):
    """Base of every rule."""

    name: ClassVar[str]
    Options: ClassVar[type[RuleOptions]] = RuleOptions

    def __init__(self, options: RuleOptions) -> None:
        self.options = options

    @abc.abstractmethod
    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Findings asserted at `now`; must not read a clock, do I/O or keep state."""

    def for_seconds(self, finding: Finding) -> float:
        """How long `finding` must be asserted before it fires; rules with per-check durations override."""
        del finding
        return self.options.for_seconds

    def finding(
        self,
        subject: Mapping[str, str],
        summary: str,
        evidence: Mapping[str, float | str],
        severity: Severity = Severity.WARNING,
    ) -> Finding:
        """A finding of this rule (the engine fills in state and `since`)."""
        return Finding(
            rule=self.name, subject=dict(subject), severity=severity, summary=summary, evidence=dict(evidence)
        )


# --- small statistics the rules share ---------------------------------------------------------


def finite(values: Iterable[float]) -> list[float]:
    """Only the finite values; NaN/Inf are a fault of their own, not data for statistics."""
    return [v for v in values if math.isfinite(v)]


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return quantile(values, 0.5)


def robust_scale(baseline: Sequence[float], min_scale: float) -> tuple[float, float]:
    """(median, scale) of a baseline, the scale being 1.4826 times MAD (a normal sigma).

    Floored at `min_scale` so a perfectly flat baseline does not make every tiny wobble an
    infinite z-score.
    """
    center = median(baseline)
    mad = median([abs(v - center) for v in baseline])
    return center, max(1.4826 * mad, min_scale)


def robust_z(value: float, baseline: Sequence[float], min_scale: float) -> tuple[float, float, float]:
    """(z, median, scale): how many robust standard deviations `value` lies above the baseline."""
    center, scale = robust_scale(baseline, min_scale)
    return (value - center) / scale, center, scale


def label_dict(labels: Labels) -> dict[str, str]:
    """Labels as a plain dict."""
    return dict(labels)


def subject_of(labels: Labels, keys: Sequence[str]) -> dict[str, str]:
    """The bounded subject of a series: only the named label keys, never paths or step numbers."""
    found = dict(labels)
    return {k: found[k] for k in keys if k in found}
