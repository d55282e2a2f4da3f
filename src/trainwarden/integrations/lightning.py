"""PyTorch Lightning: `TrainwardenCallback` reports to the daemon and obeys it (``trainwarden[lightning]``).

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from trainwarden.integrations.lightning import TrainwardenCallback

    warden = TrainwardenCallback()
    trainer = L.Trainer(callbacks=[warden, ModelCheckpoint(dirpath="ckpt", save_last=True)])
    trainer.fit(model, loader, ckpt_path="last")      # resumes from the newest "last" checkpoint
    raise SystemExit(warden.exit_status)              # 75 after a stop request: resume me

Hooks used (Lightning 2.x): ``setup`` / ``on_train_start`` bracket the ``init`` phase;
``on_validation_start`` / ``on_validation_end`` the ``eval`` phase; ``on_before_optimizer_step``
clips adaptively (after backward and DDP's all-reduce, before the optimizer), or drops the update of
a batch named in the control file's ``skip_batches`` (gradients to None); ``on_train_batch_end``
reports the step (batch index across epochs, the step's loss, the clipper's pre-clip norm, the
first group's lr, the batch's samples) and asks `PlannedInterrupt` for the agreed decision: a
checkpoint request is answered with ``trainer.save_checkpoint`` into the `ModelCheckpoint`'s
directory as ``last.ckpt`` (inside the ``checkpoint`` phase, then reported), a stop request with that
checkpoint and ``trainer.should_stop``. The clipper's statistics and the handled request ids travel
in the checkpoint through the callback's ``state_dict``, so ``ckpt_path="last"`` resumes exactly
(given a resumable data loader: docs/INTEGRATIONS.md).
"""

# Hook signatures are the framework's: most hooks use few of their arguments.
# ruff: noqa: ARG002

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from trainwarden.integrations.core import BatchSize, CallbackCore

if TYPE_CHECKING:
    import signal

    from trainwarden.client.clipping import ClipMode
    from trainwarden.client.reporter import Reporter
    from trainwarden.control import ClipSettings


class TrainwardenCallback(pl.Callback):
    """Reports steps and phases, clips adaptively, answers checkpoint and stop requests.

    `clip=False` leaves clipping to the module (then no grad-norm is reported). With `clip=True` the
    Trainer's own ``gradient_clip_val`` must be unset: two clippers would fight. `signals` are
    handled by `PlannedInterrupt` (default none: Lightning's own SIGTERM handling stays in charge).
    `dirpath` is where requested checkpoints go when there is no `ModelCheckpoint`.
    """

    def __init__(
        self,
        *,
        reporter: Reporter | None = None,
        clip: bool = True,
        clip_settings: ClipSettings | None = None,
        clip_mode: ClipMode = "reciprocal",
        signals: Iterable[signal.Signals] = (),
        dirpath: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.core = CallbackCore(
            reporter=reporter, clip=clip, clip_settings=clip_settings, clip_mode=clip_mode, signals=signals
        )
        self._dirpath = dirpath
        self._init_phase: Any = None
        self._eval_phase: Any = None
        self._grad_norm: Any = None
        self._skipped = False  # this batch's update was dropped (`skip_batches`)
        self._optimizer: Any = None  # the first optimizer, looked up once (its lr is read per step)
        # Looked up once in on_train_start, so each step's hooks do only what that step needs:
        self._epoch_loop: Any = None  # trainer.fit_loop.epoch_loop (its total_batch_idx is the step)
        self._report: Any = None  # the reporter's step(step, loss, grad_norm, lr, samples)
        self._batch_size = BatchSize()
        self._clipping = False  # a clipper exists: the optimizer may hold its skip flag after the step
        self._idle_before_step = False  # no clipper and no batch to skip: nothing to do before a step

    @property
    def exit_status(self) -> int:
        """75 after a stop request answered with a checkpoint (resume the job), else 0."""
        return self.core.exit_status

    # --- set-up and phases ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Open the init phase and build the clipper (callback state is restored after this hook)."""
        if stage != "fit":
            return
        if self.core.clip_enabled and trainer.gradient_clip_val:
            raise ValueError(
                "TrainwardenCallback(clip=True) clips adaptively: create the Trainer without "
                f"gradient_clip_val (got {trainer.gradient_clip_val!r}), or pass clip=False"
            )
        self._init_phase = _enter(self.core.reporter.phase("init"))
        self.core.build(pl_module.parameters())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the init phase; guard, control file and clip settings (process group exists now)."""
        _exit(self._init_phase)
        self._init_phase = None
        self.core.start(pl_module.parameters())
        self._optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._epoch_loop = trainer.fit_loop.epoch_loop
        self._report = self.core.reporter.step
        self._clipping = self.core.clipper is not None
        self._idle_before_step = not self._clipping and not self.core.skips_any

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation (and the sanity check) is the eval phase: the stall rule times it apart."""
        self._eval_phase = _enter(self.core.reporter.phase("eval"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End of the eval phase."""
        _exit(self._eval_phase)
        self._eval_phase = None

    # --- the step ---------------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Adaptive clipping after backward (and DDP's averaging); no update for a batch to skip."""
        if self._idle_before_step:
            return
        if self.core.skips_any:
            step = trainer.fit_loop.epoch_loop.total_batch_idx
            if self.core.skipping(step):
                self._skipped = True
                self.core.drop_update(optimizer, step)
                return
        self._grad_norm = self.core.clip(optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Report the step, then checkpoint and/or stop when the ranks agree a request came."""
        if self._clipping:
            self.core.after_optimizer_step()
        epoch_loop = self._epoch_loop if self._epoch_loop is not None else trainer.fit_loop.epoch_loop
        step = epoch_loop.total_batch_idx
        loss = outputs.get("loss") if type(outputs) is dict or isinstance(outputs, Mapping) else outputs
        if self._skipped:  # its loss may be the non-finite one the batch is skipped for
            loss, self._skipped = None, False
        elif loss is not None and getattr(loss, "requires_grad", False):  # Lightning: detached already
            loss = loss.detach()
        optimizer = self._optimizer
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        report = self._report if self._report is not None else self.core.reporter.step
        report(step, loss, self._grad_norm, lr, self._batch_size(batch))  # positional: the cheaper call
        self._grad_norm = None
        decision = self.core.boundary(step)
        if decision.checkpoint:
            self._save(trainer, step)
        if decision.stop:
            trainer.should_stop = True

    def _save(self, trainer: pl.Trainer, step: int) -> None:
        path = os.fspath(self._checkpoint_dir(trainer) / (ModelCheckpoint.CHECKPOINT_NAME_LAST + ".ckpt"))
        started = time.perf_counter()
        with self.core.reporter.phase("checkpoint"):
            trainer.save_checkpoint(path)  # every rank calls it; Lightning writes on rank 0 and waits
        self.core.checkpoint_saved(step, path, seconds=time.perf_counter() - started)

    def _checkpoint_dir(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            return Path(callback.dirpath)
        if self._dirpath is not None:
            return Path(self._dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    # --- state and the end ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Clipper statistics and handled request ids, saved in every Lightning checkpoint."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore them on ``ckpt_path=...`` (before ``on_train_start``)."""
        self.core.load_state_dict(state_dict)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Say goodbye once fitting is over (a crash says none, which is how the daemon tells them apart)."""
        if stage == "fit":
            _exit(self._init_phase)
            _exit(self._eval_phase)
            self._init_phase = self._eval_phase = None
            self.core.close()


def _enter(phase: Any) -> Any:
    phase.__enter__()
    return phase


def _exit(phase: Any) -> None:
    if phase is not None:
        phase.__exit__(None, None, None)
