"""Tells the daemon the moment a watched process exits, instead of at the next poll.

A pidfd (`os.pidfd_open`, Linux 5.3+) becomes readable when its process exits, whether or not the
process is our child, so one thread blocked in `poll` over every watched rank and the
supervised child wakes within microseconds of a crash. Before, a crash waited for the training
collector's next sample (`process_up`) and the next rule tick: 0.5-1.5 s on the demo's config.

Where pidfds are not available (an old kernel, another OS) `watch` answers False and the caller
keeps relying on the rules' polling; nothing else changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_WATCHED = 4096  # a node runs a few hundred ranks at most; beyond this, polling covers the rest


class ExitWatcher:
    """Calls `on_exit(pid)` from its own thread once per watched process, as soon as it exits."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # pidfd -> pid
        self._pids: dict[int, int] = {}  # pid -> pidfd
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="trainwarden-exit-watch", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> bool:
        """Start watching `pid` (idempotent); False when it is already gone or pidfds are unsupported."""
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None or pid <= 0:
            return False
        with self._lock:
            if self._stopped:
                return False
            if pid in self._pids:
                return True
            if len(self._pids) >= MAX_WATCHED:
                return False
            try:
                fd = pidfd_open(pid)
            except OSError:
                return False  # exited already (ESRCH), or no pidfd support (ENOSYS)
            self._fds[fd] = pid
            self._pids[pid] = fd
        self._wake()
        return True

    def watching(self) -> set[int]:
        """The pids watched now."""
        with self._lock:
            return set(self._pids)

    def stop(self) -> None:
        """End the thread and close every descriptor."""
        with self._lock:
            self._stopped = True
        self._wake()
        self._thread.join(5.0)
        with self._lock:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
            self._pids.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                fds = [self._wake_r, *self._fds]
            poller = select.poll()  # rebuilt per round: the wake pipe says the set changed
            for fd in fds:
                poller.register(fd, select.POLLIN)
            try:
                ready = [fd for fd, _event in poller.poll()]
            except OSError:
                continue  # interrupted; the loop sees _stopped
            exited: list[int] = []
            with self._lock:
                for fd in ready:
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    pid = self._fds.pop(fd, None)
                    if pid is None:
                        continue
                    self._pids.pop(pid, None)
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    exited.append(pid)
            for pid in exited:
                try:
                    self._on_exit(pid)
                except Exception:  # a callback's bug must not end the watching
                    log.exception("exit watcher: callback for pid %d failed", pid)
