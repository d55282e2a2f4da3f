"""In-place rollback: a recent known-good snapshot in host memory, restored without a restart.

A non-finite loss or gradient poisons the weights within a step; restarting the process to undo it
costs seconds. A `Snapshotter` keeps the last `keep` snapshots of everything the step changes
(model, optimizer(s), scheduler, clipper — anything with `state_dict`/`load_state_dict` — and every
RNG) and the step they were taken after. Every `every` steps (a *boundary*) the ranks agree, with
one small all-reduce, whether any of them saw a non-finite loss or grad-norm since the last
boundary, or read a rollback request from the daemon (`ControlState.rollback_request`). If so,
every rank restores the same snapshot in place, the first bad batch is skipped from then on, and
`steps()` continues from the snapshot; otherwise a new snapshot is taken. Nothing is read from the
device between boundaries: the finite checks stay on the device until the boundary's all-reduce.

Opt-in, `spike=SpikeCheck()` also rolls back a finite loss spike (`client/spike_check.py`): the
interval's losses travel in the same all-reduce (MAX over ranks, float64), every rank runs the
daemon's spike detector on the same numbers, and the first spiking step is rolled back and skipped
exactly like a non-finite one. Off by default: a false positive would change a healthy run.

    reporter = Reporter.from_env(job="llm", capabilities=Snapshotter.CAPABILITIES)
    snap = Snapshotter({"model": model, "optim": optimizer, "sched": scheduler, "clip": clipper},
                       every=5, reporter=reporter)
    for step in snap.steps(start, total_steps):     # jumps back after a rollback, skips bad batches
        loss = train_step(batch_at(step))            # the batch index is the step (docs/CLIENT.md)
        reporter.step(step, loss=loss.detach(), grad_norm=norm)
        snap.after_step(step, loss=loss.detach(), grad_norm=norm)

Exactness: a run that rolled back ends bit-identical to one that skipped the same batches, because
the restored state, RNG included, is the state that run had before the skipped batch. A rollback that
keeps failing is bounded (`max_rollbacks` in a row without a new snapshot); past that the job goes
on with the fault visible, and the daemon escalates to a checkpoint restart.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from trainwarden.client.spike_check import LossTrend, SpikeCheck
from trainwarden.control import ControlState

log = logging.getLogger(__name__)

MAX_HANDLED_REQUESTS = 64


class Stateful(Protocol):
    """What a snapshot holds: the `state_dict` protocol of torch modules, optimizers and schedulers."""

    def state_dict(self) -> Any: ...  # noqa: D102 - the torch protocol

    def load_state_dict(self, state: Any, /) -> Any: ...  # noqa: D102 - the torch protocol


class ControlSource(Protocol):
    """Where the daemon's requests come from: `Reporter.poll_control` (cheap: a rate-limited stat)."""

    def poll_control(self) -> ControlState: ...  # noqa: D102 - see Reporter.poll_control


@dataclass(frozen=True)
class Snapshot:
    """Host copies of the state after step `next_step - 1`, so training resumes at `next_step`."""

    next_step: int
    states: dict[str, Any]
    rng: dict[str, Any]


@dataclass(frozen=True)
class Rollback:
    """One rollback: found at `at_step`, back to `next_step`, batch `skipped` skipped from now on."""

    at_step: int
    next_step: int
    skipped: int
    reason: str


class Snapshotter:
    """Takes snapshots at boundaries and rolls every rank back together (see the module docstring)."""

    CAPABILITIES = ("rollback",)
    """Pass to `Reporter(capabilities=...)`: the hello then tells the daemon it may ask for a rollback."""

    def __init__(
        self,
        state: Mapping[str, Stateful],
        *,
        every: int = 5,
        keep: int = 2,
        reporter: ControlSource | None = None,
        auto: bool = True,
        max_rollbacks: int = 3,
        group: Any = None,
        spike: SpikeCheck | None = None,
    ) -> None:
        if every < 1 or keep < 1 or max_rollbacks < 0:
            raise ValueError(
                f"every={every} and keep={keep} must be >= 1, max_rollbacks={max_rollbacks} >= 0"
            )
        self._state = dict(state)
        self.every = every
        self.keep = keep
        self.auto = auto
        self.max_rollbacks = max_rollbacks
        self._reporter = reporter
        self._group = group
        self._snapshots: list[Snapshot] = []
        self._flags: list[tuple[int, Any]] = []  # (step, non-finite flag: bool or a device tensor)
        self._losses: list[Any] = []  # with a spike check: each step's loss (float, device tensor, None)
        self._trend = LossTrend(spike) if spike is not None else None
        self._skipped: set[int] = set()
        self._handled: list[str] = []  # daemon request ids acted upon (or found already done)
        self._in_a_row = 0  # rollbacks since the last new snapshot
        self._jump: int | None = None
        self.rollbacks: list[Rollback] = []

    # --- the loop -----------------------------------------------------------------------------

    def steps(self, start: int, stop: int) -> Iterator[int]:
        """Step indices `start..stop-1`, minus skipped batches, going back after each rollback.

        Takes the first snapshot before `start`; at the end checks the last steps too, so a fault in
        the final steps is rolled back before the loop ends.
        """
        self._snapshots = [self._take(start)]
        step = start
        while True:
            if step >= stop:
                if not self._flags or not self._boundary(stop - 1):
                    return
            elif step in self._skipped:
                step += 1
                continue
            else:
                yield step
            if self._jump is not None:
                step, self._jump = self._jump, None
            elif step < stop:
                step += 1

    def after_step(self, step: int, loss: Any = None, grad_norm: Any = None) -> bool:
        """Note this step's loss and grad-norm (tensors stay on the device); True when it rolled back.

        Call it once per completed step, on every rank. At every `every`-th call the ranks agree and
        either snapshot or roll back; `steps()` then continues from the snapshot. With a spike check
        the loss must be one value (a float or a one-element tensor), kept until the boundary.
        """
        if self._trend is not None:
            self._losses.append(_one_loss(loss))
        self._flags.append((step, _nonfinite(loss, grad_norm)))
        if len(self._flags) < self.every:
            return False
        return self._boundary(step)

    @property
    def skipped(self) -> tuple[int, ...]:
        """Batches skipped after a rollback, ascending (identical on every rank)."""
        return tuple(sorted(self._skipped))

    @property
    def loss_trend(self) -> tuple[tuple[int, float], ...]:
        """The (step, loss) points the spike check compares new losses with (empty without one).

        The run's own trajectory: a rolled-back step (and so a skipped batch) is never in it.
        """
        return self._trend.points if self._trend is not None else ()

    def state_dict(self) -> dict[str, Any]:
        """Skipped batches and handled request ids, for the checkpoint's `local` state."""
        return {"skipped": list(self.skipped), "handled": list(self._handled)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` after a resume, so a restarted job skips the same batches."""
        skipped, handled = state.get("skipped", ()), state.get("handled", [])
        if not all(isinstance(s, int) and s >= 0 for s in skipped):
            raise ValueError(f"snapshot state: 'skipped' must be step numbers, got {skipped!r}")
        if not all(isinstance(h, str) for h in handled):
            raise ValueError(f"snapshot state: 'handled' must be request ids, got {handled!r}")
        self._skipped = set(skipped)
        self._handled = list(handled)[-MAX_HANDLED_REQUESTS:]

    # --- boundaries ---------------------------------------------------------------------------

    def _boundary(self, step: int) -> bool:
        request = self._new_request()
        bad, requested, losses = self._agree(request.step if request is not None else None)
        if request is not None:
            self._handled.append(request.id)
            del self._handled[:-MAX_HANDLED_REQUESTS]
        interval = [s for s, _ in self._flags]
        self._flags.clear()
        self._losses.clear()
        spike = self._trend.first_spike(interval, losses) if self._trend is not None else None
        able = self.auto and self._in_a_row < self.max_rollbacks
        candidates = []
        if bad is not None and able:
            candidates.append((bad, "non-finite loss or grad-norm"))
        if spike is not None and able:
            candidates.append((spike.step, spike.reason))
        if requested is not None and requested not in self._skipped:
            candidates.append((requested, "the daemon asked"))
        if candidates:
            first_bad, reason = min(candidates, key=lambda c: c[0])  # the first listed of equal steps
            if self._roll_back(step, first_bad, reason):
                return True  # the interval's losses are gone with its steps
        if self._trend is not None:
            self._trend.accept(interval, losses)  # the run goes on with these steps
        if candidates:
            return False
        if bad is None and spike is None:  # never snapshot a state that may hold the fault
            self._snapshots = [*self._snapshots, self._take(step + 1)][-self.keep :]
            self._in_a_row = 0
        else:
            what = "non-finite values" if bad is not None else "a loss spike"
            log.warning("step %d: %s since the last boundary; not rolling back", step, what)
        return False

    def _roll_back(self, step: int, first_bad: int, reason: str) -> bool:
        usable = [s for s in self._snapshots if s.next_step <= first_bad]
        if not usable:
            log.warning("step %d: no snapshot from before step %d; cannot roll back", step, first_bad)
            return False
        snapshot = usable[-1]
        for name, target in self._state.items():
            # a copy: an optimizer adopts the tensors it is given, and would change the snapshot
            target.load_state_dict(copy.deepcopy(snapshot.states[name]))
        _restore_rng(snapshot.rng)
        self._snapshots = usable
        if self._trend is not None:
            self._trend.forget_from(snapshot.next_step)  # trained again (or skipped): not the trend
        self._skipped.add(first_bad)
        self._in_a_row += 1
        self._jump = snapshot.next_step
        done = Rollback(step, snapshot.next_step, first_bad, reason)
        self.rollbacks.append(done)
        log.warning(
            "step %d: %s; rolled back to step %d, skipping batch %d",
            step,
            reason,
            snapshot.next_step,
            first_bad,
        )
        return True

    def _take(self, next_step: int) -> Snapshot:
        states = {name: _host_copy(target.state_dict()) for name, target in self._state.items()}
        return Snapshot(next_step, states, _capture_rng())

    def _new_request(self) -> Any:
        if self._reporter is None:
            return None
        control = self._reporter.poll_control()
        request = control.rollback_request
        if request is None or request.id in self._handled:
            return None
        if control.should_skip(request.step):
            return None  # a restart since skips that batch: a request left in the file is done
        return request

    def _agree(self, requested: int | None) -> tuple[int | None, int | None, list[float]]:
        """First non-finite step on any rank, the request's step, each step's largest loss: one all-reduce.

        The losses come only with a spike check (else an empty list); one host read in all.
        """
        import torch  # noqa: PLC0415 - torch is imported lazily on purpose
        import torch.distributed as dist  # noqa: PLC0415

        raw = [f for _, f in self._flags]
        tensors = [v for v in (*raw, *self._losses) if isinstance(v, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        # int64 without a spike check (as before it existed); float64 with one: steps below 2**53 stay exact
        dtype = torch.int64 if self._trend is None else torch.float64
        flags = [
            f.to(device=device, dtype=dtype)
            if isinstance(f, torch.Tensor)
            else torch.tensor(int(f), dtype=dtype, device=device)
            for f in raw
        ]
        wanted = torch.tensor(-1 if requested is None else requested, dtype=dtype, device=device)
        losses = [_loss_entry(v, device) for v in self._losses]
        local = torch.stack([*flags, wanted, *losses])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self._group) > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group)
        values = local.tolist()  # the one host read of the interval
        n = len(raw)
        bad = next((step for (step, _), v in zip(self._flags, values[:n], strict=True) if v), None)
        return bad, (None if values[n] < 0 else int(values[n])), [float(v) for v in values[n + 1 :]]


def _one_loss(loss: Any) -> Any:
    """The loss as the spike check keeps it: a float, a detached one-element tensor, or None."""
    if loss is None:
        return None
    if isinstance(loss, int | float):
        return float(loss)
    if loss.numel() != 1:  # metadata only: no device sync
        raise ValueError(
            f"the spike check needs one loss value per step, got a tensor of shape {tuple(loss.shape)}"
        )
    return loss.detach()


def _loss_entry(value: Any, device: Any) -> Any:
    """A loss as a float64 entry of the boundary's MAX all-reduce.

    Non-finite losses become +inf, so MAX is well-defined (NaN compares false both ways; the step is
    flagged non-finite anyway, and the detector ignores inf); a missing loss is -inf (never the max).
    """
    import torch  # noqa: PLC0415

    if value is None:
        return torch.tensor(-math.inf, dtype=torch.float64, device=device)
    if isinstance(value, float):
        value = torch.tensor(value, dtype=torch.float64, device=device)
    entry = value.to(device=device, dtype=torch.float64).reshape(())
    return torch.where(torch.isfinite(entry), entry, torch.full_like(entry, math.inf))


def _nonfinite(loss: Any, grad_norm: Any) -> Any:
    """True (or a device bool tensor) when either value is non-finite; None values count as finite."""
    flags = []
    for value in (loss, grad_norm):
        if value is None:
            continue
        if isinstance(value, int | float):
            if not math.isfinite(value):
                return True
            continue
        import torch  # noqa: PLC0415

        flags.append(~torch.isfinite(value.detach()).all())  # stays on the device: no sync
    if not flags:
        return False
    return flags[0] if len(flags) == 1 else flags[0] | flags[1]


def _capture_rng() -> dict[str, Any]:
    """Every generator's state as it is (not JSON like a checkpoint's `client.rng`: 4x cheaper)."""
    import numpy as np  # noqa: PLC0415 - a dependency of torch's CPU wheels here, imported lazily
    import torch  # noqa: PLC0415

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the legacy global generator user code draws from
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 - see _capture_rng
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _host_copy(value: Any) -> Any:
    """A deep copy with every tensor cloned to host memory (the live state keeps changing)."""
    import torch  # noqa: PLC0415

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        copied = [_host_copy(v) for v in value]
        return copied if isinstance(value, list) else tuple(copied)
    return copy.deepcopy(value)
