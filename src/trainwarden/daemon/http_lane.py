"""The scrape lane: kept-alive scrapers served by an event loop on a thread of their own.

Why. One asyncio loop runs its ready callbacks first come, first served. A burst of a thousand
connects, or six hundred held clients timing out in the same second, puts hundreds of callbacks
in one loop turn, and a scrape that arrives then waits for all of them (measured: seconds on a
loaded node). A second loop on its own thread waits in epoll without the GIL, and when a scrape
arrives CPython hands it the GIL within its 5 ms switch interval, whatever the main loop is busy
with. Which connections move: the ones that asked a `lane` route (/metrics) and keep their
connection open, as Prometheus does, at most `HttpLimits.lane_connections` of them.

How a connection moves without losing a byte: the main loop stops reading it, lets a read
already queued in that loop turn land, takes what its reader holds, duplicates the socket's
descriptor and drops its own transport (the duplicate keeps the TCP connection open); the lane
wraps the duplicate in new streams and hands the same h11 state, with those bytes, to the same
`Connection`, which carries on with the next request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from trainwarden.daemon.http_connection import Connection

log = logging.getLogger("trainwarden.daemon.http")


class ScrapeLane:
    """An event loop on its own thread serving at most `capacity` handed-over connections."""

    def __init__(
        self,
        capacity: int,
        *,
        write_seconds: float,
        on_finished: Callable[[], None],
        exception_handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None],
    ) -> None:
        self.capacity = capacity
        self._write_seconds = write_seconds
        self._on_finished = on_finished
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(exception_handler)
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._held = 0
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="trainwarden-http-lane", daemon=True
        )

    @property
    def held(self) -> int:
        """Connections the lane serves now (or is about to)."""
        return self._held

    def start(self) -> None:
        """Start the lane's thread."""
        self._thread.start()

    def stop(self) -> None:
        """Drop the lane's connections and stop its thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()

    async def take(self, connection: Connection) -> bool:
        """Move `connection` from the running (main) loop to the lane; False when it stays here.

        A connection with a pipelined request h11 has not parsed yet stays: its order of
        answers must not depend on which loop gets to it first.
        """
        transport = connection.writer.transport
        if connection.has_unparsed_input or not isinstance(transport, asyncio.Transport):
            return False
        with self._lock:
            if self._held >= self.capacity:
                return False
            self._held += 1
        writer = connection.writer
        try:
            transport.pause_reading()
            await asyncio.sleep(0)  # a read the selector already queued in this turn lands in the reader
            connection.reader.feed_eof()
            # What this transport still buffers of the answer would be lost with it: flush it all.
            transport.set_write_buffer_limits(high=0)
            async with asyncio.timeout(self._write_seconds):
                await writer.drain()
            unread = await connection.reader.read()
            sock = writer.get_extra_info("socket")
            duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        except (ConnectionError, OSError, TimeoutError) as exc:
            log.debug("http client %s went away while moving to the scrape lane: %r", connection.client, exc)
            writer.transport.abort()
            self._finished()
            return True
        except asyncio.CancelledError:  # the server is stopping: the connection stays the main loop's
            with self._lock:
                self._held -= 1
            raise
        writer.transport.abort()  # closes this loop's descriptor only; the duplicate keeps the connection
        self._submit(self._serve(connection, duplicate, unread))
        return True

    def _submit(self, work: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop)

    async def _serve(self, connection: Connection, sock: socket.socket, unread: bytes) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except (ConnectionError, OSError) as exc:
            log.debug("http client %s went away while moving to the scrape lane: %s", connection.client, exc)
            sock.close()
            self._tasks.discard(task)
            self._finished()
            return
        try:
            connection.rebind(reader, writer, unread)
            connection.handover = None  # it is on the lane now
            await connection.serve(first=False)
        except asyncio.CancelledError:
            writer.transport.abort()  # the server is stopping
        except Exception:  # a bug here must cost one connection, never the lane
            log.exception("http connection from %s failed on the scrape lane", connection.client)
            writer.transport.abort()
        finally:
            self._tasks.discard(task)
            self._finished()

    def _finished(self) -> None:
        with self._lock:
            self._held -= 1
        self._on_finished()

    async def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
