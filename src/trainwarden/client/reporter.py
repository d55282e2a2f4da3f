"""The reporter: what a training loop calls to tell the daemon how it is doing.

Nothing here may slow or break the step. `step()` only converts its arguments and appends a
tuple to a bounded queue; a small sender thread (or, with `background=False`, the caller's own
thread, never blocking) encodes queued records and writes them to the daemon's Unix stream
socket. When the daemon is absent, slow or restarting, records are dropped and counted (the
count travels with the next step record) and the connection is retried lazily with backoff.

Tensors are welcome as values and never force a host-device sync: a CPU tensor is read at once
(no device to wait for); a GPU tensor is copied `non_blocking` into pinned host memory and an
event recorded, and its step record is sent once that event has completed, typically one step
later. Public methods never raise because of the daemon; only programming errors (an unknown
phase name) raise, at the first call. `step` itself must be a Python int.

    reporter = Reporter.from_env(job="llm")          # RANK, WORLD_SIZE... from torchrun/Slurm
    with reporter.phase("init"):
        model, loader = build()
    for step, batch in enumerate(loader):
        loss = train_step(model, batch)               # tensors are fine: no .item() needed
        reporter.step(step, loss=loss.detach(), grad_norm=norm, lr=lr, samples=len(batch))
        control = reporter.poll_control()             # a stat at most every 0.1 s
        ...
    reporter.close()                                  # also done at exit

One reporter per process, called from the training thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from trainwarden.client.identity import Identity, identity_from_env
from trainwarden.client.reporter_phase import PhaseBlock
from trainwarden.client.reporter_socket import ReporterSocket
from trainwarden.client.stackdump import install_stack_dump
from trainwarden.client.step_frame import PLAIN, Pending, copy_to_host, step_frame
from trainwarden.control import ControlFileError, ControlState, control_path, read_control
from trainwarden.protocol import (
    CAPABILITIES,
    PHASES,
    STARTUP_STAGES,
    control_dir_from_env,
    socket_path_from_env,
)

if TYPE_CHECKING:
    import socket

__all__ = ["Pending", "Reporter", "ReporterStats", "step_frame"]

log = logging.getLogger(__name__)

_Pending = Pending  # the name tests and older code import
_perf_counter = time.perf_counter  # a module global: one look-up less per step


@dataclass(frozen=True, slots=True)
class ReporterStats:
    """Counters of one reporter, for tests, benchmarks and the job's own logs."""

    queued: int
    sent: int
    dropped: int
    connects: int
    connect_failures: int
    control_reads: int
    control_errors: int
    internal_errors: int
    connected: bool


_all_reporters: weakref.WeakSet[Reporter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's socket: writing to it would interleave frames. Go quiet.
    for reporter in list(_all_reporters):
        reporter._forked()  # noqa: SLF001 - module-private hook


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _known_capabilities(capabilities: Iterable[str]) -> tuple[str, ...]:
    unknown = sorted(set(capabilities) - set(CAPABILITIES))
    if unknown:  # a typo in the caller's code, like a bad phase name
        raise ValueError(f"unknown capabilities {unknown} (known: {list(CAPABILITIES)})")
    return tuple(sorted(set(capabilities)))


class Reporter(ReporterSocket):
    """Reports steps, phases, checkpoints and collectives of one rank to the local daemon.

    `Reporter.from_env(job=...)` is the usual way in; `background=False` drains on the caller's
    thread instead of a sender thread (never blocking; records beyond the socket buffer drop).
    `capabilities=("rollback",)` (`Snapshotter.CAPABILITIES`) says the loop can roll back in place.
    """

    def __init__(
        self,
        job: str | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        control_dir: str | os.PathLike[str] | None = None,
        identity: Identity | None = None,
        env: Mapping[str, str] | None = None,
        background: bool = True,
        max_queue: int = 10_000,
        flush_interval: float = 0.05,
        control_interval: float = 0.1,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        stack_dump: bool = True,
        capabilities: Iterable[str] = (),
    ) -> None:
        # Told to the daemon in every hello: `rollback` makes it ask for a rollback before a restart.
        self.capabilities = _known_capabilities(capabilities)
        self.identity = identity or identity_from_env(job, env)
        # faulthandler on SIGUSR2, so the daemon can read this rank's stacks before killing a hang
        self.stack_file = (
            install_stack_dump(self.identity.job, self.identity.rank, env) if stack_dump else None
        )
        self.socket_path = Path(socket_path) if socket_path is not None else socket_path_from_env(env)
        self.control_dir = Path(control_dir) if control_dir is not None else control_dir_from_env(env)
        self._background = background
        self._max_queue = max_queue
        self._flush_interval = flush_interval
        self._control_interval = control_interval
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

        self._queue: deque[tuple[Any, ...]] = deque()
        self._waiting: deque[tuple[Any, ...]] = deque()  # GPU step records, in step order
        self._out = bytearray()
        self._out_frames: deque[int] = deque()  # sizes of the frames in _out, to count losses
        self._sock: socket.socket | None = None
        self._next_attempt = 0.0
        self._backoff = backoff_initial
        self._closed = False
        self._disabled = False
        self._lock = threading.Lock()  # one drainer at a time (thread vs. flush/close)
        self._wake = threading.Event()

        # Counters written by one side only, so no lock is needed on the hot path.
        self._queued = 0
        self._dropped_caller = 0  # caller thread: queue full
        self._dropped_sender = 0  # drainer: daemon absent, connection lost, buffer full
        self._sent = 0
        self._connects = 0
        self._connect_failures = 0
        self._internal_errors = 0
        self._logged: set[str] = set()

        self._last_mark: float | None = None  # end of the last step or phase
        self._phases: list[str] = []  # open phase() blocks, innermost last
        self._control_path: Path | None = None
        try:
            self._control_path = control_path(self.control_dir, self.identity.job)
        except ControlFileError as exc:
            self._log_once("control-path", f"no control file: {exc}")
        self._control_state = ControlState(job=self.identity.job)
        self._control_sig: tuple[int, int, int] | None = None
        self._control_next = 0.0
        self._control_reads = 0
        self._control_errors = 0
        self._clip_z_threshold: float | None = None

        self._connect(time.monotonic())
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="trainwarden-reporter", daemon=True)
            self._thread.start()
        _all_reporters.add(self)
        atexit.register(self.close)

    @classmethod
    def from_env(cls, job: str | None = None, **kwargs: Any) -> Reporter:
        """A reporter for this process, identity and paths from the launcher's environment."""
        return cls(job=job, **kwargs)

    # --- the hot path -------------------------------------------------------------------------

    def step(  # noqa: PLR0917 - positional use mirrors the issue's step(step, loss=...) API
        self,
        step: int,
        loss: Any = None,
        grad_norm: Any = None,
        lr: Any = None,
        samples: Any = None,
        tokens: Any = None,
    ) -> None:
        """Report a completed step. Values may be floats, ints or 0-d tensors (read without a sync)."""
        # The hot path, called every step from the training thread: one clock read, the record as a
        # flat tuple (encoded by the sender thread), and the queue append inlined, not a call away.
        now = _perf_counter()
        last = self._last_mark
        self._last_mark = now
        try:
            if type(step) is not int:
                step = int(step)
            plain = PLAIN
            if type(loss) not in plain and getattr(loss, "is_cpu", False) is True:
                loss = float(loss.item())  # the usual tensor, a CPU loss: read here, no call away
            if (
                type(loss) in plain
                and type(grad_norm) in plain
                and type(lr) in plain
                and type(samples) in plain
                and type(tokens) in plain
            ):
                record: tuple[Any, ...] = (
                    "step",
                    step,
                    None if last is None else now - last,
                    loss,
                    grad_norm,
                    lr,
                    samples,
                    tokens,
                    None,
                )
            else:
                seconds = None if last is None else now - last
                record = self._step_with_tensors(step, seconds, loss, grad_norm, lr, samples, tokens)
        except Exception as exc:
            self._internal_error("step", exc)
            return
        if self._disabled:
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._dropped_caller += 1
            return
        queue.append(record)
        self._queued += 1
        if not self._background:
            try:
                self._drain(block=False)
            except Exception as exc:
                self._internal_error("drain", exc)

    def _enqueue(self, record: tuple[Any, ...]) -> None:
        if self._disabled:
            return
        if len(self._queue) >= self._max_queue:
            self._dropped_caller += 1
            return
        self._queue.append(record)
        self._queued += 1
        if not self._background:
            try:
                self._drain(block=False)
            except Exception as exc:
                self._internal_error("drain", exc)

    def _step_with_tensors(self, step: int, seconds: float | None, *values: Any) -> tuple[Any, ...]:
        """Convert tensor values: CPU ones now, device ones via a non-blocking copy and an event."""
        plain: list[Any] = list(values)
        device: dict[int, Any] | None = None
        for i, value in enumerate(values):
            if type(value) in PLAIN:
                continue
            on_cpu = getattr(value, "is_cpu", None)  # a tensor's: far cheaper than `.device.type`
            if on_cpu:
                plain[i] = float(value.item())
                continue
            if on_cpu is None:  # not a tensor: a float or int subclass, a numpy scalar, or else
                if isinstance(value, int | float):
                    continue
                dev = getattr(value, "device", None)
                if dev is None or getattr(dev, "type", "cpu") == "cpu":
                    plain[i] = float(value.item()) if hasattr(value, "item") else float(value)
                    continue
            if device is None:
                device = {}
            device[i] = value
        pending = None
        if device:
            pending = copy_to_host(device)
            for i in device:
                plain[i] = None
        return ("step", step, seconds, *plain, pending)

    # --- other records ------------------------------------------------------------------------

    def phase(self, name: str) -> PhaseBlock:
        """Context manager marking a non-step phase: init, data, eval or checkpoint."""
        if name not in PHASES:
            raise ValueError(f"phase {name!r} is not one of {list(PHASES)}")
        return PhaseBlock(self, name)

    def _phase_ended(self, when: float) -> None:
        # The next step's duration starts here, so a checkpoint never inflates a step time.
        self._last_mark = when

    def checkpoint_saved(
        self,
        step: int,
        path: str | os.PathLike[str],
        seconds: float | None = None,
        *,
        local_skipped: int | None = None,
    ) -> None:
        """Report that a checkpoint of `step` was saved at `path`.

        `local_skipped`: how many node-local saves this process skipped so far because a write was
        still in flight (`CheckpointManager.local_skipped`); the daemon exports it per rank.
        """
        try:
            skipped = None if local_skipped is None else int(local_skipped)
            self._enqueue(("checkpoint", int(step), os.fspath(path), seconds, skipped))
        except Exception as exc:
            self._internal_error("checkpoint_saved", exc)

    def startup(self, stage: str, at: float | None = None) -> None:
        """Say this rank reached a start-up stage (`imported`, `rendezvous`, `checkpoint_loaded`).

        `at` is when (`time.time()`), so a stage passed before the reporter existed keeps its own
        time; the daemon measures each restart stage by stage from these.
        """
        if stage not in STARTUP_STAGES:  # a typo in the caller's code, like a bad phase name
            raise ValueError(f"startup stage {stage!r} is not one of {list(STARTUP_STAGES)}")
        try:
            self._enqueue(("startup", stage, time.time() if at is None else float(at)))
        except Exception as exc:
            self._internal_error("startup", exc)

    def clip_in_use(self, settings: Any) -> None:
        """Tell the daemon which clipping settings this job runs with now (call after `clipper.update`).

        This is the job's acknowledgement of a clip action: until it arrives, the daemon reports
        the action as written to the control file but not acknowledged. Sent only when the
        threshold changes, and again on every new connection (a restarted daemon learns it too).
        """
        try:
            z_threshold = float(settings.z_threshold)
        except Exception as exc:
            self._internal_error("clip_in_use", exc)
            return
        if z_threshold == self._clip_z_threshold:
            return
        self._clip_z_threshold = z_threshold
        self._enqueue(("clip", z_threshold))

    def collective(self, op: str, event: str, seq: int, nbytes: int | None, seconds: float | None) -> None:
        """Begin or end of a collective (used by `trainwarden.client.collectives`)."""
        self._enqueue(("collective", op, event, seq, nbytes, seconds))

    # --- control ------------------------------------------------------------------------------

    def poll_control(self) -> ControlState:
        """The daemon's current instructions for this job; cheap enough to call every step.

        Stats the control file at most every `control_interval` seconds and re-reads it only when
        it changed (inode, mtime or size). A missing file means no instructions; an unreadable
        or invalid one is counted and the last good state kept.
        """
        now = time.monotonic()
        if now < self._control_next or self._control_path is None:
            return self._control_state
        self._control_next = now + self._control_interval
        try:
            st = self._control_path.stat()
        except FileNotFoundError:
            if self._control_sig is not None:
                self._control_sig = None
                self._control_state = ControlState(job=self.identity.job)
            return self._control_state
        except OSError as exc:
            self._control_error(f"cannot stat {self._control_path}: {exc.strerror or exc}")
            return self._control_state
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == self._control_sig:
            return self._control_state
        self._control_sig = sig
        self._control_reads += 1
        try:
            self._control_state = read_control(self._control_path)
        except ControlFileError as exc:
            self._control_error(str(exc))
        except Exception as exc:
            self._control_error(f"{self._control_path}: {exc}")
        return self._control_state

    def _control_error(self, message: str) -> None:
        self._control_errors += 1
        self._log_once(f"control:{message}", f"keeping the previous control settings: {message}")

    # --- lifecycle ----------------------------------------------------------------------------

    def flush(self, timeout: float = 1.0) -> bool:
        """Try to send everything queued within `timeout`; True when nothing is left."""
        if self._disabled:
            return False
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._drain(block=True, deadline=deadline)
                done = not self._queue and not self._out and not self._waiting
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(0.001)

    def close(self, timeout: float = 1.0) -> None:
        """Send a bye, flush for up to `timeout` seconds and disconnect. Idempotent."""
        if self._closed:
            return
        try:
            if not self._disabled:
                self._queue.append(("bye",))
                self.flush(timeout)
        except Exception as exc:
            self._internal_error("close", exc)
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        with self._lock:
            self._disconnect(count_lost=True)
        atexit.unregister(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> ReporterStats:
        """A snapshot of this reporter's counters."""
        return ReporterStats(
            queued=self._queued,
            sent=self._sent,
            dropped=self.dropped,
            connects=self._connects,
            connect_failures=self._connect_failures,
            control_reads=self._control_reads,
            control_errors=self._control_errors,
            internal_errors=self._internal_errors,
            connected=self._sock is not None,
        )

    def _forked(self) -> None:
        self._disabled = True
        self._closed = True
        self._lock = threading.Lock()  # the sender thread may have held the old one at fork time
        self._queue.clear()
        if self._sock is not None:
            self._sock.detach()  # the parent still owns the connection; just forget our copy
            self._sock = None
