"""A pool of daemon threads for the scheduler: a hung collector can never keep the process from exiting."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class DaemonThreadPool:
    """A minimal executor of daemon threads: a hung job can never keep the process from exiting.

    (`concurrent.futures.ThreadPoolExecutor` joins its workers at interpreter exit.)
    """

    def __init__(self, workers: int, name: str = "trainwarden-worker") -> None:
        self._queue: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Queue `fn(*args)`; the future carries its result or exception."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the future's owner
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Stop the workers after the queued jobs; wait at most `timeout` for running ones."""
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            deadline = time.monotonic() + timeout
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
