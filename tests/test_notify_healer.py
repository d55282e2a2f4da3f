"""The notify healer POSTs a JSON summary to a real local webhook server, and fails cleanly when it cannot."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from trainwarden.healers.base import Action, ActionOutcome, HealerContext
from trainwarden.healers.notify import NotifyHealer, NotifyOptions


class Hook(BaseHTTPRequestHandler):
    """Records each POST; answers with the class-level status."""

    received: ClassVar[list[tuple[str, dict[str, str], Any]]] = []
    status: ClassVar[int] = 200

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        Hook.received.append((self.path, dict(self.headers), body))
        self.send_response(Hook.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Hook.received = []
    Hook.status = 200
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _healer(tmp_path: Path, url: str, token_env: str = "") -> NotifyHealer:
    context = HealerContext(runtime_dir=tmp_path, state_dir=tmp_path, clock=lambda: 1234.5)
    return NotifyHealer(NotifyOptions(url=url, timeout_seconds=2.0, token_env=token_env), context)


def _action(key: str = "spike|job=toy|0.000|alert") -> Action:
    return Action(
        "notify",
        key,
        "job toy: grad_norm spiked",
        subject={"job": "toy"},
        params={"rule": "spike", "alert": True},
        evidence={"z": 12.0, "baseline": float("nan")},
    )


def test_posts_json_summary_with_token(tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One POST carries the action as JSON, with a bearer token from the environment; a repeat is a no-op."""
    monkeypatch.setenv("TW_HOOK_TOKEN", "s3cret")
    healer = _healer(tmp_path, f"{server}/hooks/secret-path", token_env="TW_HOOK_TOKEN")
    result = healer.apply(_action(), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED
    assert "secret-path" not in result.detail
    path, headers, body = Hook.received[0]
    assert path == "/hooks/secret-path"
    assert headers["Authorization"] == "Bearer s3cret"
    assert (body["version"], body["key"], body["subject"], body["time"]) == (
        1,
        _action().key,
        {"job": "toy"},
        1234.5,
    )
    assert body["evidence"] == {"z": 12.0, "baseline": "nan"}
    assert healer.apply(_action(), dry_run=False).outcome is ActionOutcome.NOOP
    assert len(Hook.received) == 1


def test_server_error_is_failure(tmp_path: Path, server: str) -> None:
    """A non-2xx answer fails the action with the status, and a later retry may succeed."""
    Hook.status = 500
    healer = _healer(tmp_path, server)
    result = healer.apply(_action(), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "HTTP 500" in result.detail
    Hook.status = 204
    assert healer.apply(_action(), dry_run=False).outcome is ActionOutcome.APPLIED


def test_dry_run_and_unconfigured_send_nothing(tmp_path: Path, server: str) -> None:
    """A dry run and an empty URL make no request."""
    assert _healer(tmp_path, server).apply(_action(), dry_run=True).outcome is ActionOutcome.DRY_RUN
    assert _healer(tmp_path, "").apply(_action(), dry_run=False).outcome is ActionOutcome.NOOP
    assert Hook.received == []


def test_unreachable_webhook_fails_without_leaking_url(tmp_path: Path) -> None:
    """Connection refused is a failed action whose detail names the host but not the secret path."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _healer(tmp_path, f"http://127.0.0.1:{port}/T0/B1/tokentoken").apply(_action(), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "127.0.0.1" in result.detail
    assert "tokentoken" not in result.detail


def test_missing_token_env_fails(tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A configured token variable that is empty fails instead of sending unauthenticated."""
    monkeypatch.delenv("TW_MISSING", raising=False)
    result = _healer(tmp_path, server, token_env="TW_MISSING").apply(_action(), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert Hook.received == []


def test_options_reject_non_http_url() -> None:
    """A URL that is not http(s) is a config problem."""
    assert NotifyOptions(url="file:///etc/passwd").problems() == [
        ("url", "must be an http:// or https:// URL")
    ]
