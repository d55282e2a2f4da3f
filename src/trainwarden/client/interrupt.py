"""Planned interruptions: checkpoint at the next step boundary, then exit with a known code.

Slurm can warn a job before preempting or timing it out (``sbatch --signal=USR1@120`` sends
SIGUSR1 120 s ahead; SIGTERM follows at the deadline), Kubernetes and torchrun send SIGTERM, and
the trainwarden daemon can write a stop or checkpoint request into the job's control file. In each
case the handler only sets a flag; the training loop asks at each step boundary what to do::

    guard = PlannedInterrupt(signals=(signal.SIGTERM, signal.SIGUSR1), reporter=reporter)
    guard.install()
    for step in range(start, steps):
        train_step()
        boundary = guard.at_boundary(step)
        if boundary.clip is not None:
            clipper.update(boundary.clip)  # the daemon's settings, agreed: every rank, same step
        if boundary.checkpoint or step % every == 0:
            manager.save(step, state, local={"interrupt": guard.state_dict()})
        if boundary.stop:
            manager.wait()
            guard.exit()               # SystemExit(EXIT_CHECKPOINTED)

**Exit code.** `EXIT_CHECKPOINTED` = 75 (``EX_TEMPFAIL`` in sysexits.h: "temporary failure, try
again later"): the job saved a checkpoint of its last completed step and stopped on request, so
the supervisor (Slurm requeue, the daemon's restart backend) should resume it, not treat it as a
crash (1) or a finished run (0).

**Before the loop runs, a signal ends the process at once.** Until the first `at_boundary` call
there is no step to checkpoint (the newest checkpoint is as recent as it gets), and a worker still
in setup (inside `CheckpointManager.__init__`, loading a checkpoint, waiting in a gloo rendezvous)
may never reach a boundary: torchrun would wait for it and SIGKILL it after its grace period.
So a signal that arrives before the first boundary raises `SystemExit(exit_code)` from the handler
(finally blocks and atexit run); and when the main thread is blocked inside C code, where Python
runs no handler until the call returns (a gloo rendezvous waiting for a dead peer does not return
for minutes), a watcher thread woken by the signal (`signal.set_wakeup_fd`) ends the process with
`os._exit(exit_code)` after `exit_grace_seconds` (default 2 s). Once the loop is running, a signal
only sets the flag as before. A program that already uses `signal.set_wakeup_fd` (asyncio) keeps
it, and loses only the watcher.

**Ranks agree.** Signals reach ranks at different moments, and each rank polls the control file
on its own. Every `sync_every` steps the ranks all-reduce their flags (MAX, on a gloo group of
their own), so all of them checkpoint and stop at the same step; a signal sent to a single rank
stops the whole job cleanly.

**Clip settings are agreed too.** `Boundary.clip` is the clipping the daemon wrote, once every
rank has read the same settings: the sync point's all-reduce carries a fingerprint of each rank's
settings, and a change is taken only at a sync point where all fingerprints are equal (until
then the previous agreed settings stay). With replicated (DDP) gradients, ranks clipping one step
apart would update the same weights differently. `Boundary.control` stays each rank's own read.

**Requests are handled once.** Control-file request ids that were acted upon are kept in
`state_dict()`; save it with the checkpoint and load it on resume, so a restarted job does not obey
the same stop request again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn, Self

from trainwarden import protocol
from trainwarden.control import ClipSettings, ControlState

log = logging.getLogger(__name__)

EXIT_CHECKPOINTED = protocol.EXIT_CHECKPOINTED
"""Exit status after a planned stop (75): a checkpoint of the last step exists; resume the job."""

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
_MAX_HANDLED_IDS = 64
_UNSET = object()

ControlSource = Callable[[], ControlState | None]
_Handler = Callable[[int, FrameType | None], Any] | int | None


@dataclass(frozen=True, slots=True)
class Boundary:
    """What the loop must do at this step boundary (identical on every rank of a job)."""

    checkpoint: bool = False
    stop: bool = False
    reason: str = ""
    control: ControlState | None = None  # this rank's own read of the control file
    clip: ClipSettings | None = None  # the daemon's clip settings as every rank read them (agreed)


class PlannedInterrupt:
    """Turns signals and control-file requests into a checkpoint-and-exit at a step boundary."""

    def __init__(
        self,
        signals: Iterable[signal.Signals] = DEFAULT_SIGNALS,
        *,
        control: ControlSource | None = None,
        reporter: object | None = None,
        sync_every: int = 1,
        exit_code: int = EXIT_CHECKPOINTED,
        exit_grace_seconds: float = 2.0,
    ) -> None:
        """`control` returns the daemon's current `ControlState`; by default a reporter's `poll_control`."""
        if sync_every < 1:
            raise ValueError(f"sync_every={sync_every} must be >= 1")
        self.signals = tuple(signal.Signals(s) for s in signals)
        if control is None and reporter is not None:
            control = getattr(reporter, "poll_control", None)
        self.control = control
        self.sync_every = sync_every
        self.exit_code = exit_code
        self.exit_grace_seconds = exit_grace_seconds
        self.control_errors = 0
        self._armed = False  # the loop reached its first boundary
        self._watch: _SignalWatch | None = None
        self._signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, _Handler] = {}
        self._handled: list[str] = []
        self._last_control: ControlState | None = None
        self._clip_of: tuple[ControlState | None, int] = (None, 0)  # (state, fingerprint of its clip)
        self._agreed_clip: ClipSettings | None = None
        self._quiet = Boundary()  # "nothing to do" for the state last seen: reused, not rebuilt per step
        # One process only: the control state last decided with nothing in it (no new request), so
        # while the poll returns that same object and no signal came there is nothing to decide.
        self._settled: object = _UNSET
        self._dist, self._group = _setup_distributed()

    # --- signals ----------------------------------------------------------------------------------

    def install(self) -> Self:
        """Install the signal handlers (main thread only); returns self."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PlannedInterrupt.install() must be called from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.signals and not self._armed and self._watch is None:
            self._watch = _SignalWatch.start(self)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    @property
    def armed(self) -> bool:
        """True once the loop reached a boundary: from then on a signal waits for the next one."""
        return self._armed

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Once the loop runs, only set a flag: a signal handler must not save, log through locks or raise.
        if self._signal is None:
            self._signal = signal.Signals(signum)
        if not self._armed:
            raise SystemExit(self.exit_code)  # still in setup: nothing to checkpoint, leave now

    def should_stop(self) -> bool:
        """Local view of this rank: a signal arrived or a new stop request was seen (no agreement)."""
        self._arm()  # a loop that polls this is running: a signal now waits for the loop to stop
        return self._signal is not None or self._new_request(self._last_control, "stop") is not None

    # --- the boundary -------------------------------------------------------------------------

    def at_boundary(self, step: int) -> Boundary:
        """Poll the control file, agree with the other ranks, and say what to do after `step`.

        Between sync points (every `sync_every` steps) nothing is decided, so all ranks act at
        the same step. Request ids acted upon are marked handled before returning.
        """
        if not self._armed:
            self._arm()
        state = self._poll()
        if state is self._settled and self._signal is None:
            return self._quiet  # built for this state, and the agreed clip is this state's own
        if step % self.sync_every != 0:
            return self._quiet_for(state)
        stop_id = self._new_request(state, "stop")
        ckpt_id = self._new_request(state, "checkpoint")
        local = (self._signal is not None, stop_id is not None, ckpt_id is not None)
        flags, same_clip = self._agree(local, self._clip_fingerprint(state))
        if same_clip:
            self._agreed_clip = None if state is None else state.clip
        if not any(flags):
            quiet = self._quiet_for(state)
            if not self._dist:
                self._settled = state
            return quiet
        ids = self._all_ids((stop_id, ckpt_id))
        for request_id in ids:
            self._mark_handled(request_id)
        reason = self._reason(flags, ids)
        log.warning("step %d: %s", step, reason)
        stop = flags[0] or flags[1]
        return Boundary(checkpoint=True, stop=stop, reason=reason, control=state, clip=self._agreed_clip)

    def _quiet_for(self, state: ControlState | None) -> Boundary:
        """The quiet Boundary of this state and the agreed clip: reused until either changes."""
        quiet = self._quiet
        if quiet.control is not state or quiet.clip is not self._agreed_clip:
            quiet = self._quiet = Boundary(control=state, clip=self._agreed_clip)
        return quiet

    def _clip_fingerprint(self, state: ControlState | None) -> int:
        """A 56-bit digest of the state's clip settings (0 for none), computed once per state read."""
        seen, fingerprint = self._clip_of
        if state is seen:
            return fingerprint
        fingerprint = 0 if state is None else clip_fingerprint(state.clip)
        self._clip_of = (state, fingerprint)
        return fingerprint

    def _arm(self) -> None:
        if self._armed:
            return
        self._armed = True
        if self._watch is not None:
            self._watch.stop()  # no longer needed: the loop itself stops at a boundary
            self._watch = None

    def exit(self) -> NoReturn:
        """Leave with `exit_code` (raises SystemExit, so finally blocks and atexit still run)."""
        log.warning("planned stop: exiting with status %d", self.exit_code)
        sys.exit(self.exit_code)

    def _reason(self, flags: tuple[bool, bool, bool], ids: list[str]) -> str:
        parts = []
        if flags[0]:
            parts.append(
                f"signal {self._signal.name}" if self._signal is not None else "signal on another rank"
            )
        if flags[1]:
            parts.append("stop requested")
        if flags[2]:
            parts.append("checkpoint requested")
        if ids:
            parts.append(f"(request ids {', '.join(ids)})")
        return " ".join(parts)

    def _poll(self) -> ControlState | None:
        if self.control is None:
            return self._last_control
        try:
            state = self.control()
        except Exception as exc:
            # A bad control file must never stop training: keep the previous state, count it.
            self.control_errors += 1
            log.warning("control poll failed (keeping previous settings): %s", exc)
            return self._last_control
        if state is not None:
            self._last_control = state
        return self._last_control

    def _new_request(self, state: ControlState | None, kind: str) -> str | None:
        if state is None:
            return None
        request = state.stop_request if kind == "stop" else state.checkpoint_request
        if request is None or request in self._handled:
            return None
        return request

    def _mark_handled(self, request_id: str) -> None:
        if request_id not in self._handled:
            self._handled.append(request_id)
            del self._handled[:-_MAX_HANDLED_IDS]

    # --- checkpointed state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Request ids already acted upon (JSON-able); save with the checkpoint."""
        return {"handled": list(self._handled)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the handled request ids from `state_dict()`."""
        handled = state.get("handled", [])
        if not isinstance(handled, list) or not all(isinstance(h, str) for h in handled):
            raise ValueError(f"interrupt state: 'handled' must be a list of strings, got {handled!r}")
        self._handled = list(handled)[-_MAX_HANDLED_IDS:]
        self._settled = _UNSET  # a request handled before may be new again

    # --- agreement across ranks ---------------------------------------------------------------

    def _agree(self, local: tuple[bool, bool, bool], clip: int) -> tuple[tuple[bool, bool, bool], bool]:
        """The flags OR-ed over ranks, and whether every rank read the same clip settings.

        One all-reduce (MAX) of the three flags and of the fingerprint and its negation: the
        maximum and minus the minimum, equal exactly when all fingerprints are.
        """
        if not self._dist:
            return local, True
        import torch  # noqa: PLC0415 - torch is imported lazily on purpose
        import torch.distributed as dist  # noqa: PLC0415

        values = torch.tensor([*(int(v) for v in local), clip, -clip], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group)
        a, b, c, highest, minus_lowest = values.tolist()
        return (bool(a), bool(b), bool(c)), highest == -minus_lowest

    def _all_ids(self, mine: tuple[str | None, str | None]) -> list[str]:
        ids: list[tuple[str | None, str | None]] = [mine]
        if self._dist:
            import torch.distributed as dist  # noqa: PLC0415

            ids = [(None, None)] * dist.get_world_size(self._group)
            dist.all_gather_object(ids, mine, group=self._group)
        out: list[str] = []
        for pair in ids:
            out.extend(i for i in pair if i is not None and i not in out)
        return out


def clip_fingerprint(settings: ClipSettings | None) -> int:
    """A digest of clip settings that is equal across processes exactly for equal settings (0: none).

    56 bits of BLAKE2b over the fields as float reprs (a float's repr round-trips; 2 and 2.0 are
    the same setting), so it fits an int64 and two different settings collide with a chance of 2^-56.
    """
    if settings is None:
        return 0
    text = repr(tuple(float(v) for v in dataclasses.astuple(settings))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=7).digest(), "big") | 1


class _SignalWatch:
    """Ends a process whose main thread is blocked in C when a signal arrives before the loop runs.

    CPython's C-level handler writes each signal's number to the wakeup fd from whichever thread
    the kernel picked, even while the main thread cannot run Python; this thread reads it.
    """

    def __init__(
        self, guard: PlannedInterrupt, reader: socket.socket, writer: socket.socket, old: int
    ) -> None:
        self._guard = guard
        self._reader = reader
        self._writer = writer
        self._old = old
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainwarden-interrupt-watch", daemon=True)

    @classmethod
    def start(cls, guard: PlannedInterrupt) -> _SignalWatch | None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # noqa: FBT003 - stdlib signature
        try:
            old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:  # not the main thread, or a closed fd
            log.info("trainwarden: no signal watcher (%s)", exc)
            reader.close()
            writer.close()
            return None
        if old != -1:  # someone else's (asyncio): keep theirs
            signal.set_wakeup_fd(old)
            reader.close()
            writer.close()
            log.info("trainwarden: signal.set_wakeup_fd is in use; no signal watcher during setup")
            return None
        watch = cls(guard, reader, writer, old)
        _WATCH_FDS.add(writer.fileno())
        global _AT_FORK_REGISTERED  # noqa: PLW0603 - one registration per process
        if not _AT_FORK_REGISTERED:
            os.register_at_fork(after_in_child=_forget_wakeup_in_child)
            _AT_FORK_REGISTERED = True
        watch._thread.start()
        return watch

    def _run(self) -> None:
        wanted = {int(s) for s in self._guard.signals}
        while not self._stopped.is_set():
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data or self._stopped.is_set():
                return
            if wanted.intersection(data) and not self._guard.armed:
                # The handler raises SystemExit as soon as the main thread runs Python; if it is
                # stuck in C, nothing will: leave without it once the grace period is over.
                if self._stopped.wait(self._guard.exit_grace_seconds) or self._guard.armed:
                    return
                with contextlib.suppress(Exception):
                    code = self._guard.exit_code
                    sys.stderr.write(f"trainwarden: signal in setup, main thread blocked; exiting {code}\n")
                    sys.stderr.flush()
                os._exit(self._guard.exit_code)

    def stop(self) -> None:
        """Give the wakeup fd back and end the thread (callable from the main thread only)."""
        self._stopped.set()
        mine = self._writer.fileno()
        with contextlib.suppress(ValueError):
            current = signal.set_wakeup_fd(self._old)
            if current != mine:  # set by someone else since: theirs stays
                signal.set_wakeup_fd(current)
        _WATCH_FDS.discard(mine)
        self._writer.close()  # the reader sees EOF
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        self._reader.close()


_WATCH_FDS: set[int] = set()
_AT_FORK_REGISTERED = False


def _forget_wakeup_in_child() -> None:
    """A forked child (a DataLoader worker) must not wake its parent's watcher with its own signals."""
    with contextlib.suppress(ValueError, OSError):
        current = signal.set_wakeup_fd(-1)
        if current not in _WATCH_FDS:
            signal.set_wakeup_fd(current)


def _setup_distributed() -> tuple[bool, Any]:
    try:
        import torch.distributed as dist  # noqa: PLC0415
    except ImportError:
        return False, None
    if not (dist.is_available() and dist.is_initialized()):
        return False, None
    # Our own CPU group: the per-step flag exchange never needs a device sync or touches NCCL.
    return True, dist.new_group(backend="gloo")
