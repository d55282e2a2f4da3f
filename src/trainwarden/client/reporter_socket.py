"""The reporter's sending half: connect, encode queued records, write them without blocking.

A mixin of `Reporter`, split out so the reporter module holds the caller-facing API and this one
the socket. Runs on the sender thread (or the caller's, with `background=False`) under `_lock`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from trainwarden.client.identity import Identity
from trainwarden.client.step_frame import Pending, step_frame
from trainwarden.protocol import (
    CONTROL_DIR_ENV,
    CONTROL_SUBDIR,
    PROTOCOL_VERSION,
    SOCKET_ENV,
    SOCKET_NAME,
    encode,
)

# The reporter's logger name, which users filter on, stays the same after the split.
log = logging.getLogger("trainwarden.client.reporter")

_OUT_HIGH_WATER = 256 * 1024  # stop encoding once this much waits for the socket
_OUT_MAX = 1024 * 1024  # beyond this (daemon not reading) buffered frames are dropped
_MAX_WAITING = 1024  # GPU step records waiting for their copy to land
_IDLE_WAIT = 0.05  # longest sleep of an idle sender thread: records wait at most this long
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_RECONNECT_ERRORS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED, errno.EBADF}


class ReporterSocket:
    """Sending state and methods of a reporter; `Reporter.__init__` sets every attribute."""

    identity: Identity
    stack_file: Path | None
    capabilities: tuple[str, ...]
    socket_path: Path
    _flush_interval: float
    _backoff_initial: float
    _backoff_max: float
    _queue: deque[tuple[Any, ...]]
    _waiting: deque[tuple[Any, ...]]
    _out: bytearray
    _out_frames: deque[int]
    _sock: socket.socket | None
    _next_attempt: float
    _backoff: float
    _closed: bool
    _disabled: bool
    _lock: threading.Lock
    _wake: threading.Event
    _dropped_caller: int
    _dropped_sender: int
    _sent: int
    _connects: int
    _connect_failures: int
    _internal_errors: int
    _logged: set[str]
    _clip_z_threshold: float | None

    @property
    def dropped(self) -> int:
        """Records dropped so far (queue full, daemon absent, connection lost)."""
        return self._dropped_caller + self._dropped_sender

    # --- sending ------------------------------------------------------------------------------

    def _run(self) -> None:
        # step() never signals the thread (that would cost the caller); it polls instead, every
        # flush_interval while busy, backing off to _IDLE_WAIT when there is nothing to send. The
        # default (50 ms) sends the records of several short steps in one write and takes the GIL
        # once for them: waking per record cost the training thread more than the hooks did.
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
            pending: Pending | None = waiting[0][-1]
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
            return _checkpoint_dict(record)
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
        if self.capabilities:
            hello["capabilities"] = list(self.capabilities)
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


def _checkpoint_dict(record: tuple[Any, ...]) -> dict[str, Any]:
    """("checkpoint", step, path, seconds, local_skipped) as its wire object."""
    out: dict[str, Any] = {"type": "checkpoint", "step": record[1], "path": record[2][:4096]}
    if record[3] is not None:
        out["seconds"] = float(record[3])
    if len(record) > 4 and record[4] is not None:
        out["local_skipped"] = record[4]
    return out
