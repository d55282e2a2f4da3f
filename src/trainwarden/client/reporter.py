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
import errno
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from trainwarden.client.identity import Identity, identity_from_env
from trainwarden.client.stackdump import install_stack_dump
from trainwarden.control import ControlFileError, ControlState, control_path, read_control
from trainwarden.protocol import (
    CONTROL_DIR_ENV,
    CONTROL_SUBDIR,
    HEADER,
    PHASES,
    PROTOCOL_VERSION,
    SOCKET_ENV,
    SOCKET_NAME,
    STARTUP_STAGES,
    control_dir_from_env,
    encode,
    socket_path_from_env,
    wire_float,
)

log = logging.getLogger(__name__)

_OUT_HIGH_WATER = 256 * 1024  # stop encoding once this much waits for the socket
_OUT_MAX = 1024 * 1024  # beyond this (daemon not reading) buffered frames are dropped
_MAX_WAITING = 1024  # GPU step records waiting for their copy to land
_IDLE_WAIT = 0.05  # longest sleep of an idle sender thread: records wait at most this long
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_RECONNECT_ERRORS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED, errno.EBADF}


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


class _Pending:
    """Tensor values copied to pinned host memory; readable once `event` has completed."""

    __slots__ = ("event", "tensors")

    def __init__(self, tensors: dict[int, Any], event: Any) -> None:
        self.tensors = tensors
        self.event = event

    def ready(self) -> bool:
        return bool(self.event.query())


_PLAIN = frozenset({type(None), float, int})


_all_reporters: weakref.WeakSet[Reporter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's socket: writing to it would interleave frames. Go quiet.
    for reporter in list(_all_reporters):
        reporter._forked()  # noqa: SLF001 - module-private hook


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Phase:
    """Context manager for one non-step phase."""

    __slots__ = ("_name", "_reporter", "_started")

    def __init__(self, reporter: Reporter, name: str) -> None:
        self._reporter = reporter
        self._name = name
        self._started = 0.0

    def __enter__(self) -> Self:
        self._started = time.perf_counter()
        self._reporter._phases.append(self._name)  # noqa: SLF001
        self._reporter._enqueue(("phase", self._name, "begin", None))  # noqa: SLF001
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ended = time.perf_counter()
        reporter = self._reporter
        stack = reporter._phases  # noqa: SLF001
        if stack and stack[-1] == self._name:
            stack.pop()
        reporter._phase_ended(ended)  # noqa: SLF001
        reporter._enqueue(("phase", self._name, "end", ended - self._started))  # noqa: SLF001
        if stack:  # back in the enclosing phase (e.g. data loading inside eval)
            reporter._enqueue(("phase", stack[-1], "begin", None))  # noqa: SLF001


class Reporter:
    """Reports steps, phases, checkpoints and collectives of one rank to the local daemon.

    `Reporter.from_env(job=...)` is the usual way in; `background=False` drains on the caller's
    thread instead of a sender thread (never blocking; records beyond the socket buffer drop).
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
        flush_interval: float = 0.005,
        control_interval: float = 0.1,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        stack_dump: bool = True,
    ) -> None:
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
        now = time.perf_counter()
        last = self._last_mark
        self._last_mark = now
        seconds = None if last is None else now - last
        try:
            plain = _PLAIN
            if (
                type(loss) in plain
                and type(grad_norm) in plain
                and type(lr) in plain
                and type(samples) in plain
                and type(tokens) in plain
            ):
                record: tuple[Any, ...] = (
                    "step",
                    int(step),
                    seconds,
                    loss,
                    grad_norm,
                    lr,
                    samples,
                    tokens,
                    None,
                )
            else:
                record = self._step_with_tensors(int(step), seconds, loss, grad_norm, lr, samples, tokens)
        except Exception as exc:
            self._internal_error("step", exc)
            return
        self._enqueue(record)

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
        device: dict[int, Any] = {}
        for i, value in enumerate(values):
            if type(value) in _PLAIN or isinstance(value, int | float):
                continue
            dev = getattr(value, "device", None)
            if dev is None or getattr(dev, "type", "cpu") == "cpu":
                plain[i] = float(value.item()) if hasattr(value, "item") else float(value)
                continue
            device[i] = value
        pending = None
        if device:
            pending = _copy_to_host(device)
            for i in device:
                plain[i] = None
        return ("step", step, seconds, *plain, pending)

    # --- other records ------------------------------------------------------------------------

    def phase(self, name: str) -> _Phase:
        """Context manager marking a non-step phase: init, data, eval or checkpoint."""
        if name not in PHASES:
            raise ValueError(f"phase {name!r} is not one of {list(PHASES)}")
        return _Phase(self, name)

    def _phase_ended(self, when: float) -> None:
        # The next step's duration starts here, so a checkpoint never inflates a step time.
        self._last_mark = when

    def checkpoint_saved(self, step: int, path: str | os.PathLike[str], seconds: float | None = None) -> None:
        """Report that a checkpoint of `step` was saved at `path`."""
        try:
            self._enqueue(("checkpoint", int(step), os.fspath(path), seconds))
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

    @property
    def dropped(self) -> int:
        """Records dropped so far (queue full, daemon absent, connection lost)."""
        return self._dropped_caller + self._dropped_sender

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

    # --- sending ------------------------------------------------------------------------------

    def _run(self) -> None:
        # step() never signals the thread (that would cost the caller); it polls instead, every
        # flush_interval while busy, backing off to _IDLE_WAIT when there is nothing to send.
        idle_wait = self._flush_interval
        while not self._closed:
            if not self._queue and not self._waiting and not self._out:
                self._wake.wait(idle_wait)
                self._wake.clear()
                idle_wait = min(idle_wait * 2, max(_IDLE_WAIT, self._flush_interval))
                continue
            idle_wait = self._flush_interval
            try:
                with self._lock:
                    self._drain(block=True, deadline=time.monotonic() + self._flush_interval)
            except Exception as exc:
                self._internal_error("sender", exc)
            if self._waiting or self._out:
                time.sleep(self._flush_interval)  # waiting on the GPU or the daemon: do not spin

    def _drain(self, *, block: bool, deadline: float = 0.0) -> None:
        """Encode queued records and write them; with `block`, wait for the socket until `deadline`."""
        now = time.monotonic()
        if self._sock is None and not self._connect(now):
            self._drop_everything()
            return
        while True:
            self._encode_ready()
            if not self._out:
                return
            if not self._send_some():
                return  # disconnected; dropped frames already counted
            if not self._out and not self._queue:
                return
            if self._out:
                remaining = deadline - time.monotonic()
                if not block or remaining <= 0 or self._sock is None:
                    return
                select.select([], [self._sock], [], min(remaining, 0.05))

    def _encode_ready(self) -> None:
        """Move queued records into the output buffer, GPU steps once their copy has landed.

        Steps stay in order: once one waits for its device copy, later steps wait behind it.
        Other records (phases, collectives) are never held back by a waiting step.
        """
        self._release_waiting()
        waiting = self._waiting
        queue = self._queue
        while queue and len(self._out) < _OUT_HIGH_WATER:
            record = queue.popleft()
            if record[0] != "step":
                self._append_frame(self._to_dict(record))
            elif record[-1] is None and not waiting:
                self._append_step(record)
            else:
                if len(waiting) >= _MAX_WAITING:
                    waiting.popleft()
                    self._dropped_sender += 1
                waiting.append(record)

    def _release_waiting(self) -> None:
        """Encode waiting steps from the front whose device copies have landed."""
        waiting = self._waiting
        while waiting and len(self._out) < _OUT_HIGH_WATER:
            pending: _Pending | None = waiting[0][-1]
            if pending is not None:
                try:
                    if not pending.ready():
                        break
                except Exception as exc:  # a broken device must not wedge the queue behind it
                    waiting.popleft()
                    self._dropped_sender += 1
                    self._internal_error("device event", exc)
                    continue
            values = list(waiting.popleft())
            if pending is not None:
                for i, host in pending.tensors.items():
                    values[3 + i] = float(host.item())  # host memory: no device sync
            self._append_step(tuple(values))

    def _append_step(self, record: tuple[Any, ...]) -> None:
        try:
            frame = step_frame(record, self.dropped)
        except (ValueError, TypeError) as exc:
            self._internal_error("encode", exc)
            self._dropped_sender += 1
            return
        self._append_bytes(frame)

    def _append_frame(self, data: dict[str, Any]) -> None:
        try:
            frame = encode(data)
        except (ValueError, TypeError) as exc:
            self._internal_error("encode", exc)
            self._dropped_sender += 1
            return
        self._append_bytes(frame)

    def _append_bytes(self, frame: bytes) -> None:
        if len(self._out) + len(frame) > _OUT_MAX:
            self._dropped_sender += 1
            return
        self._out += frame
        self._out_frames.append(len(frame))

    def _to_dict(self, record: tuple[Any, ...]) -> dict[str, Any]:
        kind = record[0]
        if kind == "phase":
            out: dict[str, Any] = {"type": "phase", "phase": record[1], "event": record[2]}
            if record[3] is not None:
                out["seconds"] = record[3]
            return out
        if kind == "checkpoint":
            out = {"type": "checkpoint", "step": record[1], "path": record[2][:4096]}
            if record[3] is not None:
                out["seconds"] = float(record[3])
            return out
        if kind == "collective":
            out = {"type": "collective", "op": record[1], "event": record[2], "seq": record[3]}
            if record[4] is not None:
                out["bytes"] = record[4]
            if record[5] is not None:
                out["seconds"] = record[5]
            return out
        if kind == "clip":
            return {"type": "clip", "z_threshold": record[1]}
        if kind == "startup":
            return {"type": "startup", "stage": record[1], "at": record[2]}
        return {"type": "bye", "dropped": self.dropped}

    def _send_some(self) -> bool:
        """One non-blocking send of the output buffer; False when the connection was lost."""
        sock = self._sock
        if sock is None:
            return False
        try:
            sent = sock.send(self._out, _MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            if exc.errno not in _RECONNECT_ERRORS:
                self._log_once(f"send:{exc.errno}", f"send to {self.socket_path} failed: {exc}")
            self._disconnect(count_lost=True)
            self._schedule_retry(time.monotonic())
            return False
        del self._out[:sent]
        frames = self._out_frames
        while frames and sent >= frames[0]:
            sent -= frames.popleft()
            self._sent += 1
        if frames and sent:
            frames[0] -= sent
        return True

    def _connect(self, now: float) -> bool:
        if self._disabled or now < self._next_attempt:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)  # noqa: FBT003 - stdlib signature
        try:
            sock.connect(os.fspath(self.socket_path))
        except OSError as exc:
            sock.close()
            self._connect_failures += 1
            self._schedule_retry(now)
            if self._connect_failures == 1 and self._connects == 0:
                # Once, and only before the first connection: a daemon restarting later is normal.
                # A warning, not info, because a wrong socket path otherwise goes unnoticed for
                # the whole run (e.g. the daemon started with another --runtime-dir).
                log.warning(
                    "trainwarden daemon not reachable at %s (%s); reports are dropped until it is. "
                    "If the daemon runs with another --runtime-dir, set %s=<runtime-dir>/%s "
                    "(and %s=<runtime-dir>/%s) in the job's environment",
                    self.socket_path,
                    exc.strerror or exc,
                    SOCKET_ENV,
                    SOCKET_NAME,
                    CONTROL_DIR_ENV,
                    CONTROL_SUBDIR,
                )
            return False
        self._sock = sock
        self._connects += 1
        self._backoff = self._backoff_initial
        # The hello goes first on every connection; partial frames of a dead one are gone.
        self._out.clear()
        self._out_frames.clear()
        hello = self.identity.hello(PROTOCOL_VERSION)
        if self.stack_file is not None:
            hello["stack_file"] = str(self.stack_file)
        self._append_frame(hello)
        if self._clip_z_threshold is not None:
            self._append_frame({"type": "clip", "z_threshold": self._clip_z_threshold})
        return True

    def _schedule_retry(self, now: float) -> None:
        self._next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def _disconnect(self, *, count_lost: bool) -> None:
        if count_lost:
            # The hello is not a report; every other frame not fully sent is a lost record.
            self._dropped_sender += len(self._out_frames)
        self._out.clear()
        self._out_frames.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _drop_everything(self) -> None:
        n = len(self._queue) + len(self._waiting)
        self._queue.clear()
        self._waiting.clear()
        self._dropped_sender += n

    # --- errors -------------------------------------------------------------------------------

    def _internal_error(self, where: str, exc: BaseException) -> None:
        self._internal_errors += 1
        self._log_once(f"internal:{where}", f"trainwarden reporter: {where} failed: {exc!r}")

    def _log_once(self, key: str, message: str) -> None:
        if key in self._logged or len(self._logged) > 100:
            return
        self._logged.add(key)
        log.warning("%s", message)


_PACK = HEADER.pack


def _signal_text(value: Any) -> str:
    number = float(value)  # also turns numpy scalars and bools into plain floats
    return repr(number) if number - number == 0.0 else f'"{wire_float(number)}"'  # inf-inf is NaN


def _count_text(value: Any) -> str | None:
    number = float(value)
    return repr(number) if number - number == 0.0 and number >= 0.0 else None


def step_frame(record: tuple[Any, ...], dropped: int) -> bytes:
    """Encode a step record as one frame without json.dumps (about 2x cheaper, same strict JSON).

    `repr` of a finite float is valid JSON; a non-finite loss or grad-norm travels as a string
    (see `protocol.wire_float`); a non-finite or negative lr, samples or tokens is left out.
    """
    _, step, seconds, loss, grad_norm, lr, samples, tokens, _pending = record
    text = f'{{"type":"step","step":{int(step)},"dropped":{int(dropped)}'
    if seconds is not None:
        text += f',"step_seconds":{float(seconds)!r}'
    if loss is not None:
        text += f',"loss":{_signal_text(loss)}'
    if grad_norm is not None:
        text += f',"grad_norm":{_signal_text(grad_norm)}'
    if lr is not None and (value := _count_text(lr)) is not None:
        text += f',"lr":{value}'
    if samples is not None and (value := _count_text(samples)) is not None:
        text += f',"samples":{value}'
    if tokens is not None and (value := _count_text(tokens)) is not None:
        text += f',"tokens":{value}'
    body = (text + "}").encode()
    return _PACK(len(body)) + body


def _copy_to_host(values: dict[int, Any]) -> _Pending:
    """Start non-blocking device→pinned-host copies and record an event after them."""
    import torch  # noqa: PLC0415 - only reached when the caller already uses device tensors

    hosts: dict[int, Any] = {}
    device = None
    for i, value in values.items():
        src = value.detach()
        device = src.device
        # Pinned memory makes the copy truly asynchronous; the caching host allocator reuses it.
        host = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
        host.copy_(src, non_blocking=True)
        hosts[i] = host
    event = torch.Event(device=device)  # device-agnostic (cuda, xpu, ...): query() never blocks
    event.record()
    return _Pending(hosts, event)
