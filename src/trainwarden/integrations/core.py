"""What the framework callbacks share: one reporter, one clipper, one planned-interrupt guard.

A framework callback calls these in its own hooks, so the two integrations behave the same:

- `start(parameters)` once training begins (after the framework has set up its process group):
  builds the `AdaptiveClipper` and the `PlannedInterrupt` (its agreement group needs the process
  group), reads the control file once and applies its clip settings, and acknowledges them;
- `skipping(step)` / `drop_update(optimizer)` right before the optimizer step: a batch the daemon
  named in `skip_batches` (the state read at start, the same on every rank) changes nothing: every
  gradient is set to None, which `torch.optim` optimizers skip (no parameter, moment or step-count
  change); the framework still ran its forward and backward and still steps its scheduler;
- `clip(optimizer)` right before the optimizer step: adaptive clipping in place, the pre-clip norm
  as a tensor (no host sync), and the skip flag handed to a fused optimizer for that step;
- `report(...)` and `boundary(step)` once a step is done: the step record, then the agreed
  checkpoint and stop decisions (`Boundary`);
- `state_dict()` / `load_state_dict()`: the clipper's statistics and the handled request ids,
  saved with the framework's checkpoint so a resumed run continues exactly and never obeys the same
  request twice.

Clip settings the daemon writes later are taken from `Boundary.clip`, which the ranks agree on,
so every rank clips alike from the same step: ranks reading the file one step apart would
otherwise update replicated weights differently (docs/CLIENT.md, "Clipping changes across ranks").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from trainwarden.client.clipping import AdaptiveClipper, ClipMode
from trainwarden.client.interrupt import EXIT_CHECKPOINTED, Boundary, PlannedInterrupt
from trainwarden.client.reporter import Reporter

if TYPE_CHECKING:
    import signal

    import torch

    from trainwarden.control import ClipSettings

log = logging.getLogger(__name__)

STATE_VERSION = 1
"""Format of `CallbackCore.state_dict()`; a checkpoint with another version is refused by name."""


class IntegrationStateError(ValueError):
    """Callback state in a checkpoint that cannot be used (wrong version or shape)."""


class CallbackCore:
    """The client objects one framework callback drives; see the module docstring for the order."""

    def __init__(
        self,
        *,
        reporter: Reporter | None = None,
        clip: bool = True,
        clip_settings: ClipSettings | None = None,
        clip_mode: ClipMode = "reciprocal",
        signals: Iterable[signal.Signals] = (),
        sync_every: int = 1,
    ) -> None:
        self._reporter = reporter
        self.clip_enabled = clip
        self._clip_settings = clip_settings
        self._clip_mode: ClipMode = clip_mode
        self._signals = tuple(signals)
        self._sync_every = sync_every
        self.clipper: AdaptiveClipper | None = None
        self.guard: PlannedInterrupt | None = None
        self.stopped = False
        self._pending_state: Mapping[str, Any] | None = None
        self._found_inf_on: Any = None
        self._skip_batches: tuple[tuple[int, int], ...] = ()
        self._clip_taken: ClipSettings | None = None  # the agreed clip settings last applied

    @property
    def reporter(self) -> Reporter:
        """The reporter (created from the environment on first use)."""
        if self._reporter is None:
            self._reporter = Reporter.from_env()
        return self._reporter

    @property
    def exit_status(self) -> int:
        """75 (`EXIT_CHECKPOINTED`) after a planned stop with a checkpoint, else 0: the exit status."""
        return EXIT_CHECKPOINTED if self.stopped else 0

    # --- start ------------------------------------------------------------------------------------

    def build(self, parameters: Iterable[torch.Tensor]) -> None:
        """Create the clipper (parameters known), then apply callback state loaded before it existed."""
        if self.clip_enabled and self.clipper is None:
            self.clipper = AdaptiveClipper(parameters, self._clip_settings, mode=self._clip_mode)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def start(self, parameters: Iterable[torch.Tensor]) -> None:
        """Training begins: clipper, guard, the control file read once, clip settings acknowledged."""
        if self.guard is None:
            guard = PlannedInterrupt(self._signals, reporter=self.reporter, sync_every=self._sync_every)
            self.guard = guard.install() if self._signals else guard
        self.build(parameters)
        control = self.reporter.poll_control()
        # Read once, before the first step: every rank of a (re)started job read the same file.
        self._skip_batches = control.skip_batches
        if self.clipper is not None:
            if control.clip is not None:
                self.clipper.update(control.clip)
            self.reporter.clip_in_use(self.clipper.settings)

    # --- the step ---------------------------------------------------------------------------------

    @property
    def skips_any(self) -> bool:
        """Whether the control state read at start names any batch to skip (cheap: checked per step)."""
        return bool(self._skip_batches)

    def skipping(self, step: int) -> bool:
        """Whether the daemon named batch `step` to skip (in the control state read at start)."""
        return bool(self._skip_batches) and any(a <= step <= b for a, b in self._skip_batches)

    def drop_update(self, optimizer: Any, step: int) -> None:
        """Make the coming optimizer step a no-op: gradients to None, which `torch.optim` skips.

        Neither clipped nor learnt from (the clipper's statistics stay as they were): the batch may
        be the non-finite one the daemon restarted the job for.
        """
        log.warning("step %d: skipping this batch's update (skip_batches in the control file)", step)
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None

    def clip(self, optimizer: Any = None) -> Any:
        """Clip in place before the optimizer step; the pre-clip norm (a tensor), or None without a clipper.

        A fused optimizer (``fused=True``, GradScaler's protocol) is also told, through its
        ``found_inf`` for this one step, to change nothing when the clipper skipped the step;
        `after_optimizer_step` takes the flag away again.
        """
        if self.clipper is None:
            return None
        norm = self.clipper.clip()
        flag = self.clipper.skip_flag
        if (
            flag is not None
            and optimizer is not None
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and not hasattr(optimizer, "found_inf")
        ):
            optimizer.found_inf = flag
            self._found_inf_on = optimizer
        return norm

    def after_optimizer_step(self) -> None:
        """Remove the skip flag `clip` lent the optimizer (idempotent)."""
        optimizer, self._found_inf_on = self._found_inf_on, None
        if optimizer is not None and hasattr(optimizer, "found_inf"):
            del optimizer.found_inf

    def report(
        self, step: int, *, loss: Any = None, grad_norm: Any = None, lr: Any = None, samples: Any = None
    ) -> None:
        """One step record (values may be tensors: the reporter never syncs)."""
        self.reporter.step(step, loss=loss, grad_norm=grad_norm, lr=lr, samples=samples)

    def boundary(self, step: int) -> Boundary:
        """The agreed checkpoint/stop decision after `step`, and the daemon's agreed clip settings."""
        if self.guard is None:
            return Boundary()
        decision = self.guard.at_boundary(step)
        clip = decision.clip
        if clip is not self._clip_taken and self.clipper is not None and clip is not None:
            # `Boundary.clip` is the same object until the ranks agree on new settings: taken once.
            self._clip_taken = clip
            if self.clipper.update(clip):
                self.reporter.clip_in_use(self.clipper.settings)
        if decision.stop:
            self.stopped = True
        return decision

    def checkpoint_saved(self, step: int, path: str, seconds: float | None = None) -> None:
        """Tell the daemon a checkpoint of `step` exists at `path`."""
        self.reporter.checkpoint_saved(step, path, seconds=seconds)

    # --- checkpointed state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state to save with the framework's checkpoint."""
        return {
            "version": STATE_VERSION,
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "interrupt": None if self.guard is None else self.guard.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; parts whose object does not exist yet are applied when it does."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise IntegrationStateError(
                f"trainwarden callback state: version {version!r} is not {STATE_VERSION} "
                "(a checkpoint written by another trainwarden)"
            )
        waiting = (state.get("clipper") is not None and self.clipper is None and self.clip_enabled) or (
            state.get("interrupt") is not None and self.guard is None
        )
        if self.clipper is not None and state.get("clipper") is not None:
            self.clipper.load_state_dict(state["clipper"])
        if self.guard is not None and state.get("interrupt") is not None:
            self.guard.load_state_dict(state["interrupt"])
        if waiting:
            self._pending_state = state

    def close(self) -> None:
        """Say goodbye to the daemon (a rank that said goodbye finished; one that vanished crashed)."""
        if self.guard is not None and self._signals:
            self.guard.uninstall()
        if self._reporter is not None:
            self._reporter.close()


def batch_size(batch: Any) -> int | None:
    """Samples in a batch: the first dimension of the first tensor found (None when there is none).

    Per step, `BatchSize` is cheaper: it looks first where the previous batch had its tensor.
    """
    for _ in range(3):  # tensor, (tensor, ...), {"input": tensor, ...}
        shape = getattr(batch, "shape", None)
        if shape is not None:
            return int(shape[0]) if len(shape) else None
        if isinstance(batch, list | tuple):  # before Mapping: an ABC's isinstance is the slow one
            batch = batch[0] if batch else None
        elif isinstance(batch, Mapping):
            batch = next(iter(batch.values()), None)
        else:
            return None
    return None


class BatchSize:
    """`batch_size` for a stream of batches of one structure: where the tensor was is remembered.

    A loader yields batches of the same shape of container, so after the first batch a tensor or
    a tuple/list whose first item is a tensor of the remembered type is read in two look-ups;
    anything else (a dict, a changed structure) takes `batch_size`'s search, which learns again.
    """

    __slots__ = ("_leaf", "_outer")

    def __init__(self) -> None:
        self._outer: Any = None  # tuple or list holding the tensor first; None: the batch is it
        self._leaf: Any = None  # the tensor's type

    def __call__(self, batch: Any) -> int | None:
        """Samples in `batch` (see `batch_size`)."""
        kind = type(batch)
        if kind is self._outer:
            first: Any = batch[0] if batch else None
            if type(first) is self._leaf:
                shape = first.shape
                if shape:
                    return int(shape[0])
        elif kind is self._leaf and self._outer is None:
            shape = batch.shape
            if shape:
                return int(shape[0])
        size = batch_size(batch)
        self._learn(batch, size)
        return size

    def _learn(self, batch: Any, size: int | None) -> None:
        self._outer = self._leaf = None
        if size is None:
            return
        if getattr(batch, "shape", None) is not None:
            self._leaf = type(batch)
        elif isinstance(batch, list | tuple) and getattr(batch[0], "shape", None) is not None:
            self._outer, self._leaf = type(batch), type(batch[0])
