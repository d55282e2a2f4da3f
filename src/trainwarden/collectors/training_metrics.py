"""The training metric contract: every series the training collector exports, declared once.

Rules, dashboards and docs/METRICS.md refer to these names; the collector only renders them.
"""

from __future__ import annotations

from trainwarden.model import MetricKind, MetricSpec
from trainwarden.protocol import PHASES

_RANK = ("job", "rank")
_G = MetricKind.GAUGE

TRAIN_STEP = MetricSpec("trainwarden_train_step", "Last reported training step.", _G, _RANK, window=True)
LAST_STEP_TS = MetricSpec(
    "trainwarden_train_last_step_timestamp_seconds",
    "When the daemon received the last step record.",
    _G,
    _RANK,
)
STEP_SECONDS = MetricSpec(
    "trainwarden_train_step_seconds",
    "Duration of each step as measured by the client (one windowed point per step).",
    _G,
    _RANK,
    window=True,
)
STEP_DURATION = MetricSpec(
    "trainwarden_train_step_duration_seconds", "Distribution of step durations.", MetricKind.HISTOGRAM, _RANK
)
LOSS = MetricSpec(
    "trainwarden_train_loss", "Last reported loss (NaN/Inf passed through).", _G, _RANK, window=True
)
GRAD_NORM = MetricSpec(
    "trainwarden_train_grad_norm", "Last reported pre-clip gradient norm.", _G, _RANK, window=True
)
LEARNING_RATE = MetricSpec("trainwarden_train_learning_rate", "Last reported learning rate.", _G, _RANK)
SAMPLES_PER_SECOND = MetricSpec(
    "trainwarden_train_samples_per_second", "Samples of the last step divided by its duration.", _G, _RANK
)
TOKENS_PER_SECOND = MetricSpec(
    "trainwarden_train_tokens_per_second", "Tokens of the last step divided by its duration.", _G, _RANK
)
PHASE = MetricSpec(
    "trainwarden_train_phase", "1 for the rank's current phase, 0 for the others.", _G, (*_RANK, "phase")
)
PHASE_STARTED = MetricSpec(
    "trainwarden_train_phase_started_timestamp_seconds", "When the rank's current phase began.", _G, _RANK
)
PHASE_SECONDS = MetricSpec(
    "trainwarden_train_phase_seconds",
    "Duration of each completed non-step phase (one windowed point per phase).",
    _G,
    (*_RANK, "phase"),
    window=True,
)
RESTART_COUNT = MetricSpec(
    "trainwarden_train_launcher_restarts", "Restarts of the job as the launcher counts them.", _G, _RANK
)
ROLLBACK_CAPABLE = MetricSpec(
    "trainwarden_train_rollback_capable",
    "1 when the rank's hello says it can roll back in place to a snapshot (the policy prefers that).",
    _G,
    _RANK,
)
CLIP_Z_THRESHOLD = MetricSpec(
    "trainwarden_train_clip_z_threshold",
    "Clipping z-threshold the rank reports running with (its acknowledgement of a clip action).",
    _G,
    _RANK,
)
EXITED_CLEANLY = MetricSpec(
    "trainwarden_train_exited_cleanly",
    "1 once the rank's process said goodbye (a finished rank, not a crash); 0 while it runs.",
    _G,
    _RANK,
)
PID = MetricSpec("trainwarden_train_pid", "Process id of the rank (as the daemon sees it).", _G, _RANK)
PROCESS_UP = MetricSpec("trainwarden_train_process_up", "1 while the rank's process exists.", _G, _RANK)
COLLECTIVE_IN_FLIGHT = MetricSpec(
    "trainwarden_train_collective_in_flight_seconds",
    "Age of the oldest collective begun and not ended, 0 if none.",
    _G,
    _RANK,
)
COLLECTIVE_DURATION = MetricSpec(
    "trainwarden_train_collective_duration_seconds",
    "Distribution of collective durations as timed by the client.",
    MetricKind.HISTOGRAM,
    ("job", "op"),
)
LAST_CHECKPOINT_STEP = MetricSpec(
    "trainwarden_train_last_checkpoint_step", "Step of the last checkpoint the rank reported.", _G, _RANK
)
LAST_CHECKPOINT_TS = MetricSpec(
    "trainwarden_train_last_checkpoint_timestamp_seconds",
    "When the last checkpoint record arrived.",
    _G,
    _RANK,
)
LOCAL_SAVES_SKIPPED = MetricSpec(
    "trainwarden_train_checkpoint_local_skipped_total",
    "Node-local saves the rank skipped because its previous write was still in flight"
    " (the client's count, sent with each checkpoint record; it restarts with the process).",
    MetricKind.COUNTER,
    _RANK,
)
RECEIVED = MetricSpec(
    "trainwarden_client_records_received_total",
    "Client records accepted (valid and applied).",
    MetricKind.COUNTER,
)
REJECTED = MetricSpec(
    "trainwarden_client_records_rejected_total",
    "Client records or connections refused, by reason.",
    MetricKind.COUNTER,
    ("reason",),
)
DROPPED = MetricSpec(
    "trainwarden_client_records_dropped_total",
    "Records the client itself dropped (daemon absent or slow), as it reported them.",
    MetricKind.COUNTER,
    _RANK,
)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)
COLLECTIVE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
ALL_PHASES = ("step", *PHASES)
