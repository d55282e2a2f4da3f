"""Clip healer: tighten (or relax) the job's adaptive gradient clipping through its control file.

Tightening lowers the clipper's z-score threshold by `tighten_factor` (never below
`min_z_threshold`), so the next spikes are clipped harder; relaxing moves it back toward the
defaults. The change persists across job restarts because the restarted job reads the same file.
Idempotent: the control file remembers the last action key applied, so applying the same action
twice changes nothing; a dry run reads and reports but never writes.

Writing the file is not the same as the job clipping harder: a loop with a plain
`clip_grad_norm_` never reads it. A job acknowledges by reporting the settings it runs with
(`Reporter.clip_in_use`, exported as `trainwarden_train_clip_z_threshold`); until every reporting
rank of the job runs with the written threshold the action is "written, not acknowledged" — in
its detail, in `trainwarden_clip_acknowledged{job} 0`, and from `acknowledged(job, z)`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from trainwarden.config import PluginOptions
from trainwarden.control import (
    ClipSettings,
    ControlFileError,
    ControlState,
    control_path,
    read_control,
    write_control,
)
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.model import MetricSpec, Sample
from trainwarden.protocol import default_control_dir

log = logging.getLogger(__name__)

LAST_ACTION_KEY = "trainwarden_clip_action"
CLIP_IN_USE = "trainwarden_train_clip_z_threshold"
MAX_REMEMBERED = 1024  # acknowledged action keys kept for took_effect
ACKNOWLEDGED = MetricSpec(
    "trainwarden_clip_acknowledged",
    "1 once every reporting rank of the job runs with the z-threshold the clip healer last wrote; "
    "0 while it is written, not acknowledged.",
    labelnames=("job",),
)


@dataclass(frozen=True)
class ClipOptions(PluginOptions):
    """How far one action moves the clipping threshold.

    `control_dir` defaults to `<runtime_dir>/control`, where the training collector writes control
    files (`protocol.default_control_dir`; the client finds it via TRAINWARDEN_CONTROL_DIR).
    """

    control_dir: Path | None = None
    tighten_factor: float = 0.8
    relax_factor: float = 1.25
    min_z_threshold: float = 1.5

    def problems(self) -> list[tuple[str, str]]:
        """Factors must move the threshold the right way."""
        found = super().problems()
        if not 0 < self.tighten_factor < 1:
            found.append(("tighten_factor", "must be in (0, 1)"))
        if self.relax_factor <= 1:
            found.append(("relax_factor", "must be > 1"))
        if self.min_z_threshold <= 0:
            found.append(("min_z_threshold", "must be > 0"))
        return found


class ClipHealer(Healer):
    """Changes `ControlState.clip` of the job named in the action's subject."""

    name = "clip"
    Options = ClipOptions

    def __init__(self, options: PluginOptions, context: HealerContext) -> None:
        super().__init__(options, context)
        self._written: dict[str, float] = {}  # job -> z_threshold last written
        self._acked_at: dict[str, float] = {}  # action key -> when its acknowledgement was first seen

    def acknowledged(self, job: str, z_threshold: float) -> bool:
        """Whether the job's ranks report running with `z_threshold` (all that report; at least one)."""
        store = self.context.store
        if store is None:
            return False
        reported = [s.value for s in store.find(CLIP_IN_USE) if dict(s.labels).get("job") == job]
        return bool(reported) and all(abs(value - z_threshold) < 1e-9 for value in reported)

    def took_effect(self, action: Action, applied_at: float) -> float | None:
        """When the job was first seen running with this action's settings; None until it is.

        The policy's hook (`Healer.took_effect`): a spike observed before the job runs with the
        new clipping says nothing about it. An action since superseded in the control file (a
        later clip action, a removed file) counts as in effect when it was applied.
        """
        if action.key in self._acked_at:
            return self._acked_at[action.key]
        job = action.subject.get("job", "")
        try:
            path = self.control_file(job)
            state = read_control(path) if path.exists() else None
        except ControlFileError:
            return applied_at
        if state is None or state.clip is None or state.extra.get(LAST_ACTION_KEY) != action.key:
            return applied_at
        if not self.acknowledged(job, state.clip.z_threshold):
            return None
        store = self.context.store
        reports = store.find(CLIP_IN_USE) if store is not None else []
        seen = [s.timestamp for s in reports if dict(s.labels).get("job") == job]
        if len(self._acked_at) >= MAX_REMEMBERED:
            del self._acked_at[next(iter(self._acked_at))]
        self._acked_at[action.key] = max([applied_at, *seen])
        return self._acked_at[action.key]

    def samples(self) -> list[Sample]:
        """`trainwarden_clip_acknowledged{job}` for each job this healer wrote clipping settings for."""
        return [
            ACKNOWLEDGED.sample(1.0 if self.acknowledged(job, z) else 0.0, job=job)
            for job, z in sorted(self._written.items())
        ]

    def control_file(self, job: str) -> Path:
        """The control file of `job`."""
        options = self.options
        assert isinstance(options, ClipOptions)
        directory = options.control_dir or default_control_dir(self.context.runtime_dir)
        return control_path(directory, job)

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:  # noqa: PLR0911 - one return per checked state
        """Tighten (default) or relax (`params.direction = "relax"`) the job's clipping."""
        options = self.options
        assert isinstance(options, ClipOptions)
        job = action.subject.get("job", "")
        direction = str(action.params.get("direction", "tighten"))
        if direction not in {"tighten", "relax"}:
            return ActionResult(ActionOutcome.FAILED, f"unknown direction {direction!r} (tighten or relax)")
        try:
            path = self.control_file(job)
            state = read_control(path) if path.exists() else ControlState(job=job)
        except ControlFileError as exc:
            # never overwrite a file we cannot read: it may hold a checkpoint or stop request
            return ActionResult(ActionOutcome.FAILED, f"control file of job {job!r} unusable: {exc}")
        if state.extra.get(LAST_ACTION_KEY) == action.key:
            written = (state.clip or ClipSettings()).z_threshold
            ack = "acknowledged" if self.acknowledged(job, written) else "written, not acknowledged"
            return ActionResult(
                ActionOutcome.NOOP, f"action {action.key} already applied to {path.name} ({ack})"
            )
        current = state.clip or ClipSettings()
        default = ClipSettings()
        if direction == "tighten":
            wanted = max(options.min_z_threshold, current.z_threshold * options.tighten_factor)
        else:
            wanted = min(default.z_threshold, current.z_threshold * options.relax_factor)
        wanted = round(wanted, 4)
        data: dict[str, str | float | int | bool] = {
            "job": job,
            "direction": direction,
            "z_threshold_before": current.z_threshold,
            "z_threshold_after": wanted,
        }
        if wanted == current.z_threshold:
            limit = "floor" if direction == "tighten" else "default"
            return ActionResult(ActionOutcome.NOOP, f"clip z_threshold already at its {limit} {wanted}", data)
        change = f"{direction} clip z_threshold {current.z_threshold} -> {wanted} for job {job}"
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would {change}", data)
        new_state = dataclasses.replace(
            state,
            job=job,
            clip=dataclasses.replace(current, z_threshold=wanted),
            updated_at=self.context.clock(),
            extra={**state.extra, LAST_ACTION_KEY: action.key},
        )
        try:
            write_control(path, new_state)
        except OSError as exc:
            return ActionResult(ActionOutcome.FAILED, f"cannot write {path}: {exc.strerror or exc}", data)
        self._written[job] = wanted
        acknowledged = self.acknowledged(job, wanted)
        data["acknowledged"] = acknowledged
        status = "acknowledged" if acknowledged else "written, not acknowledged by the job yet"
        log.info("clip: %s (%s)", change, status)
        return ActionResult(ActionOutcome.APPLIED, f"{change} ({status})", data)


HEALER = ClipHealer
