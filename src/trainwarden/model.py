"""The neutral data types every stage shares: metric specs, samples, findings, actions, job processes.

Collectors produce `Sample`s, the store keeps them, the exporter renders them and rules read
them; the policy turns `Finding`s into `Action`s, healers and restart backends answer with an
`ActionResult`, and both read the daemon's `JobView` of a job's rank processes. The types live here,
at the bottom, so that every stage imports them downward and none needs another's internals.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

Labels = tuple[tuple[str, str], ...]
"""Label pairs, sorted by name: hashable so they can key the store."""


class MetricKind(enum.StrEnum):
    """Prometheus metric types we export."""

    GAUGE = "gauge"
    COUNTER = "counter"
    INFO = "info"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """What a series is: its name, help text, type and label names.

    Declared once per collector module as constants. `window` asks the store to keep a bounded
    history of the series for rules; most host series need only their latest value.
    Counter names end in `_total`. Histogram samples carry the full sample name
    (`..._bucket`, `..._sum`, `..._count`) in `Sample.suffix`.
    """

    name: str
    help: str
    kind: MetricKind = MetricKind.GAUGE
    labelnames: tuple[str, ...] = ()
    window: bool = False

    def __post_init__(self) -> None:
        if not self.name.startswith("trainwarden_"):
            raise ValueError(f"metric {self.name!r} lacks the trainwarden_ prefix")
        if self.kind is MetricKind.COUNTER and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")

    def sample(self, value: float, timestamp: float | None = None, suffix: str = "", **labels: str) -> Sample:
        """Build a sample of this spec; labels must be exactly `labelnames` (plus `le` for buckets)."""
        expected = set(self.labelnames) | ({"le"} if suffix == "_bucket" else set())
        if set(labels) != expected:
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(expected)}")
        return Sample(self, float(value), tuple(sorted(labels.items())), timestamp, suffix)


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one series at one time (`timestamp` None means "now, when stored")."""

    spec: MetricSpec
    value: float
    labels: Labels = ()
    timestamp: float | None = None
    suffix: str = ""

    @property
    def key(self) -> SeriesKey:
        """Identity of the series this sample belongs to."""
        return (self.spec.name + self.suffix, self.labels)

    def label(self, name: str) -> str:
        """Value of one label, or '' if absent."""
        for key, value in self.labels:
            if key == name:
                return value
        return ""


SeriesKey = tuple[str, Labels]


def labels_of(**labels: str) -> Labels:
    """Sorted label tuple from keyword arguments."""
    return tuple(sorted(labels.items()))


class Severity(enum.StrEnum):
    """How urgent a finding is; policy routes on rule name, this only informs people."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class FindingState(enum.StrEnum):
    """A finding fires, and later resolves."""

    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


def _frozen(mapping: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule's (or Alertmanager's) statement that something is wrong with a subject.

    `subject` names what is affected with bounded keys (rank, gpu, node, job); `evidence` holds
    the numbers that made the rule fire, so an on-call can check the reasoning.
    """

    rule: str
    subject: Mapping[str, str]
    severity: Severity
    summary: str
    state: FindingState = FindingState.FIRING
    since: float = 0.0
    evidence: Mapping[str, float | str] = field(default_factory=dict)
    source: str = "rule"

    @property
    def subject_key(self) -> str:
        """Stable text form of the subject, e.g. `job=toy,rank=1`."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.subject.items()))


class ActionOutcome(enum.StrEnum):
    """What happened when a healer (or a restart backend) was asked to act."""

    APPLIED = "applied"  # the change was made
    NOOP = "noop"  # state already as wanted (idempotence)
    DRY_RUN = "dry_run"  # would have acted; observe-only
    FAILED = "failed"  # tried and failed


@dataclass(frozen=True)
class Action:
    """A request to a healer. `key` identifies it for dedupe/idempotence across daemon restarts."""

    healer: str
    key: str
    reason: str
    subject: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str | float | int | bool] = field(default_factory=dict)
    evidence: Mapping[str, str | float] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionResult:
    """The outcome, with a human-readable detail an on-call can act on."""

    outcome: ActionOutcome
    detail: str
    data: Mapping[str, str | float | int | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class RankProcess:
    """One local rank of a job as the daemon knows it (from the training socket's hello)."""

    job: str
    rank: int
    local_rank: int
    pid: int
    stack_file: str = ""
    connected: bool = True  # False once its connection closed (the daemon read all it sent)
    exited_cleanly: bool = False  # it said goodbye
    checkpoint_at: float | None = None  # when its last checkpoint record arrived (daemon clock)


class JobView(Protocol):
    """The daemon's view of the training processes on this node (the training collector)."""

    def processes(self, job: str) -> Sequence[RankProcess]:
        """Every known local rank of `job`, its current pid and stack file."""
        ...

    def forget(self, job: str) -> None:
        """Drop the ranks of `job` after a restart, so its vanished pids do not read as crashes."""
        ...
