"""sd_notify against a real AF_UNIX datagram socket, as systemd provides it in NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_support import daemon_argv
from trainwarden.daemon.sdnotify import SdNotifier

FIXTURE_HOST = Path(__file__).parent / "fixtures" / "hosts" / "vm_psi"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket playing systemd's part."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_watchdog_and_stopping_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    """Each notification arrives as one datagram of KEY=VALUE lines."""
    sock, path = listener
    notifier = SdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="serving 12 series")
    assert receive(sock) == {"READY": "1", "STATUS": "serving 12 series"}
    assert notifier.watchdog()
    assert receive(sock) == {"WATCHDOG": "1"}
    assert notifier.reloading()
    message = receive(sock)
    assert message["RELOADING"] == "1"
    assert int(message["MONOTONIC_USEC"]) > 0
    assert notifier.stopping()
    assert receive(sock) == {"STOPPING": "1"}
    notifier.close()


def test_abstract_namespace_socket_is_supported() -> None:
    """A NOTIFY_SOCKET starting with '@' names a Linux abstract socket."""
    name = f"trainwarden-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert SdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receive(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    notifier = SdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.ping_interval() is None


def test_a_missing_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """If systemd's socket is gone, notify returns False and logs why."""
    notifier = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not notifier.watchdog()
    assert "sd_notify" in caplog.text
    assert "gone.sock" in caplog.text


def test_relative_notify_socket_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    """A NOTIFY_SOCKET that is neither absolute nor abstract is ignored with a warning."""
    assert not SdNotifier({"NOTIFY_SOCKET": "relative.sock"}).enabled
    assert "relative.sock" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
    env: dict[str, str], expected: float | None
) -> None:
    """Pings go at half of WatchdogSec, and only when the watchdog is meant for this process."""
    assert SdNotifier(env).ping_interval() == expected


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_daemon_process_notifies_ready_pings_watchdog_and_stops(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    """The real daemon sends READY=1 after its first collection, WATCHDOG=1 pings, then STOPPING=1."""
    sock, path = listener
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    cmd = daemon_argv(
        tmp_path, listen="127.0.0.1:0", procfs=FIXTURE_HOST / "proc", sysfs=FIXTURE_HOST / "sys"
    )
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stderr=log)
    try:
        first = receive(sock)
        assert first["READY"] == "1"
        assert "series" in first["STATUS"]
        pings = [receive(sock) for _ in range(3)]
        assert all(p == {"WATCHDOG": "1"} for p in pings)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while True:
            message = receive(sock)
            if "STOPPING" in message:
                break
            assert time.monotonic() < deadline
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
