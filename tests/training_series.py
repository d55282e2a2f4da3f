"""Synthetic training series, shaped exactly as the training collector's contract, for rule tests."""

from __future__ import annotations

from trainwarden.model import MetricKind, MetricSpec, Sample
from trainwarden.store import Store

STEP = MetricSpec("trainwarden_train_step", "step", labelnames=("job", "rank"), window=True)
LAST_STEP_TS = MetricSpec("trainwarden_train_last_step_timestamp_seconds", "ts", labelnames=("job", "rank"))
STEP_SECONDS = MetricSpec("trainwarden_train_step_seconds", "dur", labelnames=("job", "rank"), window=True)
LOSS = MetricSpec("trainwarden_train_loss", "loss", labelnames=("job", "rank"), window=True)
GRAD_NORM = MetricSpec("trainwarden_train_grad_norm", "gn", labelnames=("job", "rank"), window=True)
PHASE = MetricSpec("trainwarden_train_phase", "phase", labelnames=("job", "rank", "phase"))
PHASE_STARTED = MetricSpec(
    "trainwarden_train_phase_started_timestamp_seconds", "ps", labelnames=("job", "rank")
)
PHASE_SECONDS = MetricSpec(
    "trainwarden_train_phase_seconds", "pd", labelnames=("job", "rank", "phase"), window=True
)
PID = MetricSpec("trainwarden_train_pid", "pid", labelnames=("job", "rank"))
PROCESS_UP = MetricSpec("trainwarden_train_process_up", "up", labelnames=("job", "rank"))
IN_FLIGHT = MetricSpec("trainwarden_train_collective_in_flight_seconds", "if", labelnames=("job", "rank"))
COLL_DURATION = MetricSpec(
    "trainwarden_train_collective_duration_seconds", "cd", MetricKind.HISTOGRAM, ("job", "op")
)
PHASES = ("step", "init", "data", "eval", "checkpoint")


class TrainingFeed:
    """Feeds step records into a real Store the way the training collector does (one source, add)."""

    def __init__(self, store: Store, job: str = "toy", source: str = "training") -> None:
        self.store = store
        self.job = job
        self.source = source
        self.steps: dict[str, int] = {}

    def step(self, rank: int, at: float, seconds: float, loss: float = 1.0, grad_norm: float = 1.0) -> None:
        """One step record from `rank` arriving at `at`."""
        labels = {"job": self.job, "rank": str(rank)}
        n = self.steps[str(rank)] = self.steps.get(str(rank), 0) + 1
        self.store.add(
            self.source,
            [
                STEP.sample(n, at, **labels),
                LAST_STEP_TS.sample(at, at, **labels),
                STEP_SECONDS.sample(seconds, at, **labels),
                LOSS.sample(loss, at, **labels),
                GRAD_NORM.sample(grad_norm, at, **labels),
                PID.sample(1000 + rank, at, **labels),
                PROCESS_UP.sample(1, at, **labels),
                IN_FLIGHT.sample(0, at, **labels),
            ],
            at,
        )

    def phase(self, rank: int, phase: str, at: float, finished: tuple[str, float] | None = None) -> None:
        """Rank enters `phase` at `at`; `finished` = (phase, seconds) of the phase that just ended."""
        labels = {"job": self.job, "rank": str(rank)}
        samples = [PHASE.sample(1 if p == phase else 0, at, phase=p, **labels) for p in PHASES]
        samples.append(PHASE_STARTED.sample(at, at, **labels))
        if finished is not None:
            samples.append(PHASE_SECONDS.sample(finished[1], at, phase=finished[0], **labels))
        self.store.add(self.source, samples, at)

    def set(self, spec: MetricSpec, value: float, at: float, **labels: str) -> None:
        """Any other series of this source."""
        self.store.add(self.source, [Sample(spec, value, tuple(sorted(labels.items())), at)], at)


def steady(feed: TrainingFeed, ranks: int, start: float, count: int, seconds: float = 1.0) -> float:
    """`count` steady steps on every rank (with small deterministic jitter); returns the last time."""
    t = start
    for i in range(count):
        t = start + (i + 1) * seconds
        for rank in range(ranks):
            jitter = 0.03 * (((i * 7 + rank * 3) % 5) - 2)
            feed.step(rank, t, seconds * (1 + jitter), loss=2.0 - i * 0.001 + jitter, grad_norm=1.0 + jitter)
    return t
