"""The `trainwarden` command line: parser structure, --version and the status summary."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from trainwarden import __version__
from trainwarden.daemon import cli
from trainwarden.daemon.actions_cli import format_actions
from trainwarden.journal import Decision, Journal

STARTING: dict[str, Any] = {
    "version": "9.9.9",
    "pid": 4242,
    "uptime_seconds": 3725,
    "ready": False,
    "listen": "127.0.0.1:9871",
    "series": 12,
    "config": {
        "source": "/etc/trainwarden/config.toml",
        "last_reload": {"ok": False, "error": "[daemon] listen: expected HOST:PORT"},
    },
    "collectors": {
        "gpu": {"state": "unavailable", "last_duration_seconds": 0.0, "last_error": "unavailable: no NVML"},
        "cpu": {
            "state": "failing",
            "last_duration_seconds": 0.0021,
            "series": 0,
            "errors_total": 3,
            "timeouts_total": 0,
            "skipped_total": {"overlap": 1, "missed": 1},
            "last_error": "OSError: boom",
            "detail": {"problems": ["x" * 300]},
        },
        "nccl_ras": {"state": "disabled"},
    },
    "findings": {"firing": 1},
}


def test_status_summary_shows_state_errors_and_details() -> None:
    """The readable summary names readiness, a rejected reload, each collector's state and details."""
    out = io.StringIO()
    cli.print_status(STARTING, out)
    text = out.getvalue()
    assert "STARTING" in text
    assert "up 1h02m" in text
    assert "FAILED, running the previous config: [daemon] listen" in text
    cpu = next(line for line in text.splitlines() if line.startswith("cpu "))
    assert cpu.split()[:4] == ["cpu", "failing", "2.1ms", "0"]
    assert cpu.endswith("OSError: boom")
    assert "  2  " in cpu  # skipped overlap + missed
    gpu = next(line for line in text.splitlines() if line.startswith("gpu "))
    assert gpu.split()[:3] == ["gpu", "unavailable", "-"]
    assert next(line for line in text.splitlines() if line.startswith("nccl_ras ")).split()[1] == "disabled"
    detail = next(line for line in text.splitlines() if line.startswith("  cpu: "))
    assert detail.endswith("...")
    assert len(detail) < 200
    assert 'findings: {"firing": 1}' in text


def test_status_on_fake_gpus_says_so_before_anything_else() -> None:
    """A daemon on the NVML fixture is flagged in the summary, so nobody mistakes it for a real node."""
    document = json.loads(json.dumps(STARTING))
    document["collectors"]["gpu"] = {"state": "ok", "detail": {"fake_nvml": "/x/h100-sxm-8gpu.json"}}
    out = io.StringIO()
    cli.print_status(document, out)
    lines = out.getvalue().splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("WARNING: FAKE GPUs"))
    assert "/x/h100-sxm-8gpu.json" in lines[warning]
    assert warning < next(i for i, line in enumerate(lines) if line.startswith("COLLECTOR"))
    out = io.StringIO()
    cli.print_status(STARTING, out)
    assert "FAKE" not in out.getvalue()


def _serve(document: dict[str, Any]) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_status_into_a_pipe_closed_early_ends_without_a_traceback() -> None:
    """`trainwarden status | head -1` ends quietly: a reader that leaves is not an error to print."""
    document = json.loads(json.dumps(STARTING))
    # Far more than a pipe buffer (64 KiB), so the command is still writing when the reader leaves.
    for i in range(3000):
        document["collectors"][f"extra{i:04d}"] = {"state": "ok", "last_error": "e" * 40}
    server, url = _serve(document)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainwarden", "status", "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"trainwarden ")
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert b"Traceback" not in err, err.decode()
    assert err == b""
    assert proc.returncode == cli.EX_BROKEN_PIPE


@pytest.fixture
def status_server() -> Iterator[str]:
    """A stand-in daemon answering /status with the STARTING document."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(STARTING).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_status_exits_3_while_the_daemon_is_starting(
    status_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trainwarden status` exits 3 (not 0) while the daemon is not ready, so scripts can wait on it."""
    assert cli.main(["status", "--url", status_server]) == 3
    assert "STARTING" in capsys.readouterr().out


def test_status_json_prints_the_raw_document(status_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--json` prints exactly what /status returned."""
    cli.main(["status", "--url", status_server, "--json"])
    assert json.loads(capsys.readouterr().out) == STARTING


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the package version and exits 0."""
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert f"trainwarden {__version__}" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a subcommand the help (listing every command) goes to stderr with exit 2."""
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for command in ("daemon", "check-config", "status"):
        assert command in err


def test_every_registered_command_has_help_with_an_example() -> None:
    """Each subcommand registers a parser whose help carries a runnable example."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices: dict[str, argparse.ArgumentParser] = subparsers.choices
    assert set(choices) >= {"daemon", "check-config", "status"}
    for name, sub in choices.items():
        assert "trainwarden " in (sub.epilog or ""), f"{name} --help lacks an example"


def test_actions_table_shows_reason_exit_status_and_incident(tmp_path: Path) -> None:
    """`trainwarden actions` without --json names why, the job's exit status and the incident folder."""
    journal = Journal.in_state_dir(tmp_path)
    entry = journal.record(
        time=1_700_000_000.0,
        rule="process_exit",
        subject="job=toy",
        finding_key="process_exit|job=toy|0.000",
        healer="checkpoint_restart",
        decision=Decision.TAKEN,
        result="started",
        dry_run=False,
        reason="job toy exited with status 1",
        action_key="k1",
        evidence={"exit_code": 1},
    )
    incident = str(tmp_path / "incidents" / "20231114T221320-process_exit")
    journal.finish(
        entry, result="applied", detail="restarted job toy", time=1_700_000_001.5, incident=incident
    )
    header, row = format_actions(journal).splitlines()
    journal.close()
    for column in ("exit", "incident", "why"):
        assert column in header.split()
    assert row.endswith("job toy exited with status 1: restarted job toy")
    assert re.search(rf" live +1 +{re.escape(incident)} +job toy exited", row), row
