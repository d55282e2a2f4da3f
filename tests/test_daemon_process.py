"""The real `trainwarden daemon` process on a fixture host tree, driven over HTTP and signals."""

from __future__ import annotations

import gzip
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_support import TRAINWARDEN, Running, start_daemon, stop
from support import free_port, wait_until
from trainwarden.daemon.app import Daemon, load
from trainwarden.daemon.http import Request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_daemon(tmp_path_factory.mktemp("daemon"), "[daemon]\nlog_level = 'info'\n")
    yield running
    stop(running)


def test_metrics_over_http_carry_the_fixture_hosts_values(daemon: Running) -> None:
    """A scrape returns values read from the fixture tree plus per-collector success and build info."""
    metrics = daemon.metrics()
    assert metrics[("trainwarden_host_memory_total_bytes", ())] == 24683656 * 1024
    assert metrics[("trainwarden_host_load1", ())] == 0.11
    for collector in ("cpu", "memory", "load", "pressure", "diskstats", "netdev"):
        assert metrics[("trainwarden_collector_success", (("collector", collector),))] == 1, collector
        assert ("trainwarden_collector_duration_seconds", (("collector", collector),)) in metrics
    assert metrics[("trainwarden_daemon_ready", ())] == 1
    build = [key for key in metrics if key[0] == "trainwarden_build_info"]
    assert len(build) == 1
    assert dict(build[0][1])["version"]


def test_metrics_content_negotiation_and_gzip(daemon: Running) -> None:
    """OpenMetrics is served when asked for, and the body is gzipped when the scraper accepts it."""
    status, headers, body = daemon.get(
        "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"}
    )
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    text = gzip.decompress(body).decode()
    assert text.rstrip().endswith("# EOF")
    assert "trainwarden_collector_success" in text
    status, headers, body = daemon.get("/metrics")
    assert headers["Content-Type"].startswith("text/plain")
    assert "Content-Encoding" not in headers


def test_status_json_and_the_status_command(daemon: Running) -> None:
    """/status reports readiness and every collector; `trainwarden status` prints it readably."""
    status = daemon.status()
    assert status["ready"] is True
    collectors = status["collectors"]
    assert isinstance(collectors, dict)
    assert collectors["memory"]["state"] == "ok"
    cmd = [*TRAINWARDEN, "status", "--url", daemon.url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout
    assert "COLLECTOR" in result.stdout
    memory_line = next(line for line in result.stdout.splitlines() if line.startswith("memory "))
    assert " ok " in memory_line


def test_landing_page_unknown_paths_and_wrong_methods(daemon: Running) -> None:
    """/ links the endpoints, unknown paths get 404 and a wrong method 405 with Allow."""
    status, headers, body = daemon.get("/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b'href="/metrics"' in body
    assert daemon.get("/nope")[0] == 404
    request = urllib.request.Request(daemon.url + "/metrics", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 405
    assert info.value.headers["Allow"] == "GET"
    metrics = daemon.metrics()
    assert metrics[("trainwarden_http_requests_total", (("code", "404"), ("handler", "other")))] >= 1


def test_status_command_reports_an_unreachable_daemon() -> None:
    """`trainwarden status` against a closed port exits 1 with a readable reason."""
    port = free_port()
    cmd = [sys.executable, "-m", "trainwarden.daemon.cli", "status", "--url", f"http://127.0.0.1:{port}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 1
    assert "cannot read" in result.stderr
    assert "Connection refused" in result.stderr


def test_sighup_reloads_a_valid_config_keeps_the_old_on_an_invalid_one_and_sigterm_exits_0(
    tmp_path: Path,
) -> None:
    """SIGHUP applies a valid config, rejects an invalid one with its reason, and SIGTERM stops cleanly."""
    running = start_daemon(tmp_path, "[collectors.cpu]\ninterval_seconds = 5.0\n")
    try:
        assert ("trainwarden_host_load1", ()) in running.metrics()

        running.config.write_text("[collectors.load]\nenabled = false\n")
        running.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: running.status()["collectors"]["load"] == {"state": "disabled"},  # type: ignore[index]
            20.0,
            "load disabled",
        )
        success = ("trainwarden_config_reloads_total", (("result", "success"),))
        wait_until(lambda: running.metrics().get(success) == 1, 20.0, "the reload counted")  # counted last
        metrics = running.metrics()
        assert ("trainwarden_host_load1", ()) not in metrics
        assert metrics[success] == 1
        assert metrics[("trainwarden_config_last_reload_successful", ())] == 1

        running.config.write_text("[daemon]\nlisten = 'everywhere'\n[collectors.load]\nenabled = true\n")
        running.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: running.status()["config"]["last_reload"]["ok"] is False, 20.0, "reload rejected")  # type: ignore[index]
        status = running.status()
        assert "[daemon] listen: expected HOST:PORT" in status["config"]["last_reload"]["error"]  # type: ignore[index]
        assert status["collectors"]["load"] == {"state": "disabled"}  # type: ignore[index]
        metrics = running.metrics()
        assert metrics[("trainwarden_config_last_reload_successful", ())] == 0
        assert metrics[("trainwarden_config_reloads_total", (("result", "failure"),))] == 1
        assert running.healthy()
    finally:
        code = stop(running)
    log = running.log.read_text()
    assert code == 0, log
    assert "config reload rejected, keeping the running config" in log
    assert "received SIGTERM, stopping" in log
    assert "stopped" in log


def test_healthz_is_503_until_the_first_collection() -> None:
    """Before the first full collection /healthz answers 503, so orchestrators wait."""
    daemon = Daemon(load(None))
    response = daemon.routes.resolve("GET", "/healthz")[0]
    assert response is not None
    assert response(Request("GET", "/healthz")).status == 503
    daemon.ready.set()
    assert response(Request("GET", "/healthz")).status == 200


def test_a_taken_port_is_a_clear_error_and_exit_1(tmp_path: Path) -> None:
    """When the listen address is in use the daemon says so, names the address and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "trainwarden.daemon.cli", "daemon", "--listen", f"127.0.0.1:{port}"]
        cmd += ["--runtime-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state")]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
