"""The training collector's socket server: accept allowed uids, read frames, hand records on.

A mixin of `TrainingCollector` (kept apart so the socket handling reads on its own): one thread,
selectors over non-blocking sockets, SO_PEERCRED for the peer's uid and pid, connection limits
from `training_limits`. What a record means is the collector's business (`_apply`); refusals
go to its counters (`_reject`); a closed connection marks its rank disconnected
(`_connection_closed`).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainwarden.collectors import training_limits
from trainwarden.errors import CollectorError
from trainwarden.protocol import FrameDecoder, Reason, Record, RecordError, parse

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
READ_BUDGET = 1024 * 1024  # bytes per connection per turn, so one flood cannot starve the others
PEERCRED = struct.Struct("3i")


@dataclass
class Connection:
    """One client connection; `key` is its (job, rank) once it said hello."""

    sock: socket.socket
    pid: int
    uid: int
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    key: tuple[str, int] | None = None
    opened: float = 0.0  # time.monotonic(), like last_active
    last_active: float = 0.0


class TrainingSocketServer(abc.ABC):
    """Serves the client socket on a thread of its own; subclasses apply the records."""

    socket_path: Path
    allowed_uids: frozenset[int]

    def _init_server(self, socket_mode: int, limits: training_limits.Limits) -> None:
        self._socket_mode = socket_mode
        self._conns: dict[int, Connection] = {}
        self._limits = limits
        self._next_sweep = 0.0
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @abc.abstractmethod
    def _apply(self, conn: Connection, record: Record) -> bool:
        """Apply one valid record; False means the connection must be closed."""

    @abc.abstractmethod
    def _reject(self, reason: str, message: str) -> None:
        """Count one refusal with its bounded reason."""

    @abc.abstractmethod
    def _connection_closed(self, conn: Connection) -> None:
        """`conn` is gone: its rank (if it said hello) is no longer connected."""

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (replacing a stale one, never a live one or a non-socket) and serve."""
        listener = self._bind()
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)  # noqa: FBT003 - stdlib signature
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name="trainwarden-training", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise CollectorError(f"{path}: exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)  # stale socket of a dead daemon
            else:
                raise CollectorError(f"{path}: another process is listening on this socket")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            # chmod before listen(): until then nobody can connect, so the mode is never too open.
            path.chmod(self._socket_mode)
            listener.listen(512)
            listener.setblocking(False)  # noqa: FBT003 - stdlib signature
        except OSError as exc:
            listener.close()
            raise CollectorError(f"{path}: cannot listen: {exc.strerror or exc}") from exc
        return listener

    def close(self) -> None:
        """Stop the server thread, close every connection and remove the socket file."""
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        self._listener = None

    # --- server thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._selector is not None
        while not self._stopping.is_set():
            try:
                events = self._selector.select(timeout=1.0)
            except OSError:
                log.exception("training collector: select failed")
                self._stopping.wait(0.5)  # do not spin on a persistent error
                continue
            for key, _mask in events:
                try:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        return
                    else:
                        self._read(key.data)
                except Exception:  # a bug must not take the server down with it
                    log.exception("training collector: error while serving")
                    if isinstance(key.data, Connection):
                        self._drop_connection(key.data)
            self._sweep()

    def _sweep(self) -> None:
        """Close connections without a hello in time or silent too long (at most twice a second)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.5
        for conn in training_limits.timed_out(list(self._conns.values()), now, self._limits):
            what = "sent no hello" if conn.key is None else "was silent"
            self._reject(Reason.IDLE_TIMEOUT, f"pid {conn.pid} {what} too long; connection closed")
            self._drop_connection(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        assert self._selector is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: refuse politely, keep serving
                log.warning("training collector: accept failed: %s", exc)
                return
            pid, uid, _gid = PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
            )
            if uid not in self.allowed_uids:
                self._reject(Reason.UID_DENIED, f"connection from uid {uid} (pid {pid}) not in allowed_uids")
                sock.close()
                continue
            now = time.monotonic()
            admitted, victim = training_limits.admit(list(self._conns.values()), uid, now, self._limits)
            if not admitted:
                self._reject(
                    Reason.CONNECTION_LIMIT, f"already {len(self._conns)} connections; pid {pid} refused"
                )
                sock.close()
                continue
            if victim is not None:
                self._reject(Reason.EVICTED, f"connection of pid {victim.pid} closed to admit pid {pid}")
                self._drop_connection(victim)
            sock.setblocking(False)  # noqa: FBT003 - stdlib signature
            conn = Connection(sock=sock, pid=pid, uid=uid, opened=now, last_active=now)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Connection) -> None:
        budget = READ_BUDGET
        while budget > 0:
            try:
                data = conn.sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_connection(conn)
                return
            if not data:
                self._drop_connection(conn)
                return
            conn.last_active = time.monotonic()
            budget -= len(data)
            for payload in conn.decoder.feed(data):
                try:
                    record = parse(payload)
                except RecordError as exc:
                    self._reject(exc.reason, f"pid {conn.pid}: {exc}")
                    continue
                if not self._apply(conn, record):
                    self._drop_connection(conn)
                    return
            error = conn.decoder.error
            if error is not None:
                self._reject(error.reason, f"pid {conn.pid}: {error}")
                self._drop_connection(conn)
                return

    def _drop_connection(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        self._conns.pop(fd, None)
        conn.sock.close()
        if conn.key is not None:
            self._connection_closed(conn)
