"""Names of the training series (the training collector's contract) and helpers the rules share."""

from __future__ import annotations

from trainwarden.model import Labels
from trainwarden.rules.base import RuleView, finite
from trainwarden.store import Point

STEP = "trainwarden_train_step"
LAST_STEP_TS = "trainwarden_train_last_step_timestamp_seconds"
STEP_SECONDS = "trainwarden_train_step_seconds"
LOSS = "trainwarden_train_loss"
GRAD_NORM = "trainwarden_train_grad_norm"
PHASE = "trainwarden_train_phase"
PHASE_STARTED_TS = "trainwarden_train_phase_started_timestamp_seconds"
PHASE_SECONDS = "trainwarden_train_phase_seconds"
PID = "trainwarden_train_pid"
PROCESS_UP = "trainwarden_train_process_up"
CLEAN_EXIT = "trainwarden_train_exited_cleanly"  # proposed addition to the contract: 1 after a `bye`
COLLECTIVE_IN_FLIGHT = "trainwarden_train_collective_in_flight_seconds"
COLLECTIVE_DURATION_BUCKET = "trainwarden_train_collective_duration_seconds_bucket"

STEP_PHASE = "step"


def rank_labels(job: str, rank: str) -> Labels:
    """The {job, rank} labels of a per-rank series."""
    return (("job", job), ("rank", rank))


def current_phase(view: RuleView, job: str, rank: str) -> str:
    """The rank's current phase (the one whose phase gauge is 1); "step" when none is reported."""
    for series in view.series(PHASE):
        labels = dict(series.labels)
        if labels.get("job") == job and labels.get("rank") == rank and series.value == 1.0:
            return labels.get("phase", STEP_PHASE)
    return STEP_PHASE


def step_at(view: RuleView, job: str, rank: str, timestamp: float) -> float | None:
    """The step number reported in the same record as a point at `timestamp`, if still windowed."""
    for point in reversed(view.window(STEP, rank_labels(job, rank))):
        if point.timestamp == timestamp:
            return point.value
        if point.timestamp < timestamp:
            break
    return None


def positive_values(points: list[Point]) -> list[float]:
    """Finite, positive values of a window (durations)."""
    return [v for v in finite(p.value for p in points) if v > 0]
