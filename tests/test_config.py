"""Config loading as operators meet it: bad configs name section, key and why; the example is complete."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from trainwarden.config import Config, DaemonConfig, load_config, load_config_text
from trainwarden.daemon import cli
from trainwarden.daemon.app import Overrides, load
from trainwarden.errors import ConfigError
from trainwarden.plugins import plugin_groups

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, plugin_groups(), "test.toml")
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[deamon]\nlisten = '127.0.0.1:1'\n", "deamon: unknown section (valid: collectors, daemon,"),
        (
            "[daemon]\nlisten_addr = '0.0.0.0:1'\n",
            "[daemon] listen_addr: unknown key (valid keys: http, listen, log_level",
        ),
        ("[daemon]\nlisten = 9871\n", "[daemon] listen: expected str, got int 9871"),
        ("[daemon]\nlisten = 'localhost'\n", "[daemon] listen: expected HOST:PORT, got 'localhost'"),
        ("[daemon]\nlisten = '127.0.0.1:99999'\n", "[daemon] listen: port must be 0-65535, got '99999'"),
        (
            "[daemon]\nlog_level = 'verbose'\n",
            "[daemon] log_level: expected 'debug' | 'info' | 'warning' | 'error'",
        ),
        ("[daemon]\nwindow_seconds = -5\n", "[daemon] window_seconds: must be > 0"),
        ("[paths]\nprocfs = ''\n", "[paths] procfs: expected Path, got str ''"),
        ("daemon = 5\n", "daemon: expected a table, got int"),
        ("[collectors.cpux]\n", "[collectors] cpux: unknown collector (valid: cpu,"),
        ("[collectors.cpu]\ninterval_seconds = 0\n", "[collectors.cpu] interval_seconds: must be > 0"),
        ("[collectors.cpu]\ntimeout_seconds = -1.5\n", "[collectors.cpu] timeout_seconds: must be > 0"),
        (
            "[collectors.memory]\nenabled = 'yes'\n",
            "[collectors.memory] enabled: expected bool, got str 'yes'",
        ),
        ("[collectors.memory]\nper_cpu = true\n", "[collectors.memory] per_cpu: unknown key"),
        ("collectors = 'all'\n", "collectors: expected a table, got str"),
        ("[daemon\nlisten = 1\n", "not valid TOML"),
    ],
)
def test_each_bad_config_names_where_and_why(text: str, expected: str) -> None:
    """A bad config is rejected with a message naming its section, key and the reason."""
    found = problems_of(text)
    assert any(expected in problem for problem in found), found


def test_every_problem_is_reported_at_once() -> None:
    """Several mistakes in one file are all listed in one error, not just the first."""
    text = """
[daemon]
listen = "nowhere"
log_level = "loud"
colour = "blue"

[collectors.cpu]
interval_seconds = -1

[collectors.nvml_typo]
"""
    found = problems_of(text)
    assert len(found) == 5, found
    joined = "\n".join(found)
    for fragment in ("listen", "log_level", "colour", "interval_seconds", "nvml_typo"):
        assert fragment in joined


def test_unreadable_file_is_reported_with_its_path(tmp_path: Path) -> None:
    """A missing config file yields an error naming the file and the OS reason."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, plugin_groups())
    assert str(missing) in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_check_config_prints_every_problem_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trainwarden check-config` lists each problem on its own line and exits 1."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nlisten = 'x'\nfoo = 1\n[collectors.cpu]\nenabled = 1\n")
    assert cli.main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: 3 problem(s)" in err
    assert "[daemon] listen: expected HOST:PORT" in err
    assert "[daemon] foo: unknown key" in err
    assert "[collectors.cpu] enabled: expected bool, got int 1" in err


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped example passes check-config with exit status 0."""
    assert cli.main(["check-config", str(EXAMPLE)]) == 0
    assert f"{EXAMPLE}: OK" in capsys.readouterr().out


def test_daemon_refuses_an_invalid_config_with_ex_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trainwarden daemon` with a bad config exits 78 (no restart loop) and says why."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nwindow_seconds = 0\n")
    assert cli.main(["daemon", "--config", str(bad)]) == cli.EX_CONFIG
    assert "[daemon] window_seconds: must be > 0" in capsys.readouterr().err


def test_bad_listen_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`--listen` is validated by the argument parser with the same message as the config."""
    with pytest.raises(SystemExit) as info:
        cli.main(["daemon", "--listen", "9871"])
    assert info.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_no_file_means_safe_defaults() -> None:
    """Without a config file the daemon runs on the defaults: loopback, standard directories."""
    config = load(None)
    assert config.daemon == DaemonConfig()
    assert config.daemon.listen.startswith("127.0.0.1:")
    assert config.source == "<defaults>"


def test_command_line_overrides_win_over_the_file(tmp_path: Path) -> None:
    """Per-node flags (--listen, --runtime-dir, --path.procfs, ...) replace the file's values."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[daemon]\nlisten = '0.0.0.0:9000'\nlog_level = 'debug'\n[paths]\nsysfs = '/host/sys'\n"
        "[webhook]\nenabled = false\n"  # a non-loopback listener needs a webhook token otherwise
    )
    overrides = Overrides(listen="127.0.0.1:1", runtime_dir=tmp_path / "run", procfs=tmp_path / "proc")
    config = load(path, overrides)
    assert config.daemon.listen == "127.0.0.1:1"
    assert config.daemon.runtime_dir == tmp_path / "run"
    assert config.daemon.log_level == "debug"
    assert config.paths.procfs == tmp_path / "proc"
    assert config.paths.sysfs == Path("/host/sys")


# --- the shipped example --------------------------------------------------------------------


def _sections(text: str) -> dict[str, set[str]]:
    """Section name → keys set or shown commented out (`# key = ...`) in it, plus sub-tables."""
    found: dict[str, set[str]] = {"": set()}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            current = header.group(1)
            found.setdefault(current, set())
            parent, _, child = current.rpartition(".")
            found.setdefault(parent, set()).add(child)
            continue
        key = re.match(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if key:
            found[current].add(key.group(1))
    return found


def _example() -> Config:
    return load_config(EXAMPLE, plugin_groups())


def _sections_of_config() -> dict[str, type]:
    """Top-level sections that are dataclasses ([daemon], [paths], [policy], ...), by name."""
    hints = typing.get_type_hints(Config)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(hints[f.name], type)
    }


def test_example_config_equals_the_defaults() -> None:
    """examples/config.toml documents the real defaults: loading it changes nothing."""
    config = _example()
    for section, cls in _sections_of_config().items():
        assert getattr(config, section) == cls(), f"[{section}] differs from its defaults"
    for group, plugins in plugin_groups().items():
        for name, options_cls in plugins.items():
            assert config.plugin(group, name) == options_cls(), f"[{group}.{name}] differs from its defaults"


def test_example_config_names_every_key_of_every_plugin() -> None:
    """Every section and every field of every registered plugin appears in examples/config.toml."""
    sections = _sections(EXAMPLE.read_text())
    wanted: dict[str, type] = dict(_sections_of_config())
    assert {"daemon", "paths"} <= set(wanted)
    for group, plugins in plugin_groups().items():
        for name, options_cls in plugins.items():
            wanted[f"{group}.{name}"] = options_cls
    missing = [
        f"[{section}] {f.name}"
        for section, cls in wanted.items()
        for f in dataclasses.fields(cls)
        if f.name not in sections.get(section, set())
    ]
    assert not missing, f"add these keys (with their defaults and a comment) to {EXAMPLE}: {missing}"
