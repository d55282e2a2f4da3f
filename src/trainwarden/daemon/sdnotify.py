"""systemd's notify protocol, so `Type=notify` knows when we are ready and that we are alive.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by `NOTIFY_SOCKET`
(a leading '@' means the Linux abstract namespace). Outside systemd the variable is unset and
every call is a cheap no-op, so the daemon never needs to know how it was started.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SdNotifier:
    """Sends READY/WATCHDOG/STOPPING/RELOADING/STATUS to systemd; failures are logged, never raised."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            log.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or @abstract name", raw)
        self.watchdog_seconds = _watchdog_seconds(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self.address is not None

    def ping_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_seconds is None else self.watchdog_seconds / 2

    def notify(self, **fields: str | int) -> bool:
        """Send one message of `KEY=VALUE` lines; True if it was delivered."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """READY=1: the first full collection is done (systemd then finishes `start`)."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        """WATCHDOG=1: we are alive; systemd restarts us when these stop for WatchdogSec."""
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        """RELOADING=1 with the monotonic timestamp systemd ≥ 253 expects; READY=1 ends it."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        """STOPPING=1: a clean shutdown has begun."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """STATUS=...: one line shown by `systemctl status`."""
        return self.notify(STATUS=text.replace("\n", " "))

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """WatchdogSec from WATCHDOG_USEC, if it is meant for this process (WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
