"""Hugging Face Trainer: `TrainwardenCallback` reports to trainwarden and obeys it (``[transformers]``).

    from transformers import Trainer, TrainingArguments
    from trainwarden.integrations.transformers import TrainwardenCallback

    warden = TrainwardenCallback()
    args = TrainingArguments("ckpt", max_grad_norm=0.0, logging_steps=1, save_steps=10, report_to="none")
    trainer = Trainer(model, args, train_dataset=data, callbacks=[warden])
    trainer.train(resume_from_checkpoint=bool(get_last_checkpoint("ckpt")))
    raise SystemExit(warden.exit_status)              # 75 after a stop request: resume me

Hooks used (transformers 5.x): ``on_init_end`` / ``on_train_begin`` bracket the ``init`` phase;
``on_pre_optimizer_step`` clips adaptively (the Trainer's own clipping must be off:
``max_grad_norm=0``), or drops the update of a batch named in the control file's ``skip_batches``
(gradients to None); ``on_step_end`` reports the step (``global_step - 1``: the batch index when
``gradient_accumulation_steps`` is 1) and asks `PlannedInterrupt` for the agreed decision, turning a
checkpoint request into ``control.should_save`` and a stop request into that plus
``control.should_training_stop``; ``on_log`` adds the logged loss to the step record when the step
is logged (``logging_steps=1`` for a loss every step); ``on_save`` reports the checkpoint and writes
the callback's state (clipper statistics, handled request ids) as ``trainwarden.json`` into it,
which ``on_train_begin`` reads back on ``resume_from_checkpoint``. Prediction steps up to
``on_evaluate`` are the ``eval`` phase, and from the decision to save until ``on_save`` the
``checkpoint`` phase.
"""

# Hook signatures are the framework's: most hooks use few of their arguments.
# ruff: noqa: ARG002

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from trainwarden.integrations.core import CallbackCore

if TYPE_CHECKING:
    import signal

    from trainwarden.client.clipping import ClipMode
    from trainwarden.client.reporter import Reporter
    from trainwarden.control import ClipSettings

STATE_FILE = "trainwarden.json"
"""The callback's state inside each Trainer checkpoint directory."""


class TrainwardenCallback(TrainerCallback):
    """Reports steps and phases, clips adaptively, answers checkpoint and stop requests.

    `clip=False` leaves clipping to the Trainer (``max_grad_norm``) and reports its logged grad-norm.
    `signals` are handled by `PlannedInterrupt` (default none: the Trainer's process keeps its own).
    """

    def __init__(
        self,
        *,
        reporter: Reporter | None = None,
        clip: bool = True,
        clip_settings: ClipSettings | None = None,
        clip_mode: ClipMode = "reciprocal",
        signals: Iterable[signal.Signals] = (),
    ) -> None:
        self.core = CallbackCore(
            reporter=reporter, clip=clip, clip_settings=clip_settings, clip_mode=clip_mode, signals=signals
        )
        self._phases: dict[str, Any] = {}
        self._grad_norm: Any = None
        # The step record waiting for its logged loss: [step, loss, grad_norm, lr, samples].
        self._pending: list[Any] | None = None
        self._save_after_log = False
        self._skipped = False  # this step's update was dropped (`skip_batches`)
        self._clipping = False  # a clipper exists: the optimizer may hold its skip flag after the step
        self._idle_before_step = False  # no clipper and no step to skip: nothing to do before a step

    @property
    def exit_status(self) -> int:
        """75 after a stop request answered with a checkpoint (resume the job), else 0."""
        return self.core.exit_status

    # --- set-up -----------------------------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """The Trainer exists: what follows until training starts is the init phase."""
        self._open("init")

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Close init; clipper, guard, control file; the callback state of the checkpoint resumed from."""
        if self.core.clip_enabled and args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                "TrainwardenCallback(clip=True) clips adaptively: set TrainingArguments(max_grad_norm=0) "
                f"(got {args.max_grad_norm!r}), or pass clip=False"
            )
        self._close("init")
        if state.global_step > 0:
            saved = _checkpoint_dir(args, state.global_step) / STATE_FILE
            if saved.is_file():
                self.core.load_state_dict(json.loads(saved.read_text(encoding="utf-8")))
        self.core.start(kwargs["model"].parameters())
        self._clipping = self.core.clipper is not None
        self._idle_before_step = not self._clipping and not self.core.skips_any

    # --- the step ---------------------------------------------------------------------------------

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Adaptive clipping after backward and the gradient all-reduce; no update for a step to skip."""
        if self._idle_before_step:
            return
        optimizer = kwargs.get("optimizer")
        if optimizer is not None and self.core.skipping(state.global_step):
            self._skipped = True
            self.core.drop_update(optimizer, state.global_step)
            return
        self._grad_norm = self.core.clip(optimizer)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """Take back the skip flag lent to a fused optimizer."""
        if self._clipping:
            self.core.after_optimizer_step()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Report the step (or hold it for its logged loss), then turn agreed requests into `control`."""
        step = state.global_step - 1
        scheduler = kwargs.get("lr_scheduler")
        lr = scheduler.get_last_lr()[0] if scheduler is not None else None
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps
        record = [step, None, self._grad_norm, lr, samples]  # the reporter's step() arguments
        skipped, self._skipped = self._skipped, False
        self._grad_norm = None
        self._flush_pending()
        decision = self.core.boundary(step)
        if decision.checkpoint:
            control.should_save = True
        if decision.stop:
            control.should_training_stop = True
        if control.should_log and not skipped:  # a skipped step's logged loss may be the bad one
            self._pending = record
            self._save_after_log = bool(control.should_save)
        else:
            self.core.reporter.step(*record)
            if control.should_save:
                self._open("checkpoint")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """The logged loss (the mean since the last log, across ranks) completes the held step record."""
        pending = self._pending
        if pending is not None and logs:
            pending[1] = logs.get("loss")
            if pending[2] is None:
                pending[2] = logs.get("grad_norm")
        self._flush_pending()
        if self._save_after_log:
            self._save_after_log = False
            self._open("checkpoint")

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.core.reporter.step(*pending)

    # --- evaluation, checkpoints, the end ---------------------------------------------------------

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """Evaluation batches are the eval phase (opened at the first one)."""
        self._open("eval")

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """End of the eval phase."""
        self._close("eval")

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """Store the callback's state in the checkpoint just written and report the checkpoint."""
        self._flush_pending()
        self._save_after_log = False
        path = _checkpoint_dir(args, state.global_step)
        if state.is_world_process_zero and path.is_dir():
            _write_atomically(path / STATE_FILE, json.dumps(self.core.state_dict()))
        seconds = self._close("checkpoint")
        self.core.checkpoint_saved(state.global_step - 1, os.fspath(path), seconds=seconds)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """Send what is held and say goodbye (a crash says none: the daemon tells them apart)."""
        self._flush_pending()
        for name in list(self._phases):
            self._close(name)
        self.core.close()

    # --- phases -----------------------------------------------------------------------------------

    def _open(self, name: str) -> None:
        if name not in self._phases:
            phase = self.core.reporter.phase(name)
            phase.__enter__()
            self._phases[name] = (phase, time.perf_counter())

    def _close(self, name: str) -> float | None:
        entry = self._phases.pop(name, None)
        if entry is None:
            return None
        phase, started = entry
        phase.__exit__(None, None, None)
        return float(time.perf_counter() - started)


def _checkpoint_dir(args: TrainingArguments, global_step: int) -> Path:
    return Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{global_step}"


def _write_atomically(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
