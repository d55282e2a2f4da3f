"""`[daemon.http]`: the HTTP server's limits are set in the config, validated with it, and obeyed."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from http_support import read_all, statuses
from support import wait_until
from trainwarden.config import DaemonConfig, config_from_dict, load_config_text
from trainwarden.daemon.app import Daemon, Overrides
from trainwarden.daemon.http import HttpServer, Routes
from trainwarden.errors import ConfigError, ConfigProblem
from trainwarden.http_limits import HttpLimits
from trainwarden.plugins import plugin_groups

EXAMPLES = int(os.environ.get("TRAINWARDEN_FUZZ_EXAMPLES", "80"))
KEYS = [f.name for f in dataclasses.fields(HttpLimits)]


def _load(text: str) -> HttpLimits:
    return load_config_text(text, plugin_groups(), "test.toml").daemon.http


def test_the_defaults_are_the_servers_defaults() -> None:
    """With no `[daemon.http]` the daemon's server runs on HttpLimits' own defaults."""
    assert DaemonConfig().http == HttpLimits()
    assert _load("") == HttpLimits()


def test_a_section_sets_the_limits() -> None:
    """Every key of `[daemon.http]` reaches the limits the server is given."""
    text = (
        "[daemon.http]\nworkers = 2\nmax_connections = 50\nbacklog = 64\naccepts_per_turn = 4\n"
        "lane_connections = 2\n"
        "head_seconds = 1.5\nrequest_seconds = 3.0\nidle_seconds = 9.0\nwrite_seconds = 4.0\n"
        "max_head_bytes = 4096\nmax_target_bytes = 2048\n"
    )
    assert _load(text) == HttpLimits(
        workers=2,
        max_connections=50,
        backlog=64,
        accepts_per_turn=4,
        lane_connections=2,
        head_seconds=1.5,
        request_seconds=3.0,
        idle_seconds=9.0,
        write_seconds=4.0,
        max_head_bytes=4096,
        max_target_bytes=2048,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("workers = 0", "[daemon.http] workers: must be between 1 and 256, got 0"),
        ("workers = 100000", "[daemon.http] workers: must be between 1 and 256"),
        ("max_connections = 0", "[daemon.http] max_connections: must be between 1 and"),
        ("backlog = 70000", "[daemon.http] backlog: must be between 1 and 65535"),
        ("accepts_per_turn = 0", "[daemon.http] accepts_per_turn: must be between 1 and 1024"),
        ("lane_connections = 65", "[daemon.http] lane_connections: must be between 0 and 64, got 65"),
        ("head_seconds = 0.0", "[daemon.http] head_seconds: must be > 0, got 0.0"),
        ("idle_seconds = -1.0", "[daemon.http] idle_seconds: must be > 0"),
        ("write_seconds = nan", "[daemon.http] write_seconds: must be finite"),
        ("request_seconds = inf", "[daemon.http] request_seconds: must be finite"),
        ("request_seconds = 1e300", "[daemon.http] request_seconds: must be at most 315360000"),
        ("max_head_bytes = 10", "[daemon.http] max_head_bytes: must be between 1024 and 1048576"),
        ("max_target_bytes = 20000", "[daemon.http] max_target_bytes: must be <= max_head_bytes (16384)"),
        ("workers = 1.5", "[daemon.http] workers: expected int, got float 1.5"),
        ("workers = -3", "[daemon.http] workers: must be >= 0, got -3"),
        ("threads = 4", "[daemon.http] threads: unknown key (valid keys: accepts_per_turn, backlog,"),
    ],
)
def test_a_bad_limit_is_refused_naming_its_key(text: str, expected: str) -> None:
    """check-config, start-up and reload share the loader: each bad limit is named with its section."""
    with pytest.raises(ConfigError) as raised:
        _load(f"[daemon.http]\n{text}\n")
    assert expected in str(raised.value)


def test_http_as_a_value_rather_than_a_table_is_refused() -> None:
    """`[daemon] http = 5` is refused as not a table, not a crash."""
    with pytest.raises(ConfigError) as raised:
        _load("[daemon]\nhttp = 5\n")
    assert "[daemon] http: expected HttpLimits, got int 5" in str(raised.value)


VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 64, 1023, 1024, 65535, 65536, 0.001, 1e-300, 1e9, True, "4", [], {}]),
)


@settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.dictionaries(st.sampled_from([*KEYS, "bogus"]), VALUES, max_size=5))
def test_any_http_section_is_refused_or_runs(table: dict[str, Any]) -> None:
    """Any `[daemon.http]` table is a ConfigError naming that section, or limits a server binds and
    stops with; accepted numbers are finite and positive."""
    config = None
    problems: list[ConfigProblem] = []
    try:
        config = config_from_dict({"daemon": {"http": table}}, plugin_groups(), "fuzz.toml")
    except ConfigError as exc:
        problems = exc.problems
    if config is None:
        assert problems
        assert all(p.section in {"daemon", "daemon.http"} for p in problems), problems
        return
    limits = config.daemon.http
    for key in KEYS:
        value = getattr(limits, key)
        assert math.isfinite(value)
        assert value >= 0 if key == "lane_connections" else value > 0
    server = HttpServer("127.0.0.1", 0, Routes(), limits=limits)
    server.start()
    assert server.alive
    server.stop()
    wait_until(lambda: not server.alive, 10, "the server thread to stop")


def test_the_daemon_serves_with_the_configured_limits(tmp_path: Any) -> None:
    """A daemon started with `max_connections = 2` answers a third connection with a counted 503."""
    text = "[daemon.http]\nmax_connections = 2\n"
    config = load_config_text(text, plugin_groups(), "test.toml")
    overrides = Overrides(listen="127.0.0.1:0", runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    daemon = Daemon(overrides.apply(config), overrides=overrides)
    daemon.start()
    held: list[socket.socket] = []
    try:
        host, port = daemon.address
        server = daemon._http
        assert server is not None
        assert server.limits.max_connections == 2
        held = [socket.create_connection((host, port), timeout=10) for _ in range(2)]
        wait_until(lambda: len(server._connections) == 2, 10, "two held connections")
        with socket.create_connection((host, port), timeout=10) as third:
            third.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert statuses(read_all(third)) == [503]
        assert server._counts[("overload", "503")] == 1
    finally:
        for sock in held:
            sock.close()
        daemon.stop()
