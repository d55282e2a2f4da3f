"""The loader is the one validation check-config, start-up and reload share: every value finite and in
range, every problem under its own key path, hostile files refused with a clear error."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from trainwarden.config import Config, config_from_dict, load_config, load_config_text
from trainwarden.daemon import cli
from trainwarden.errors import ConfigError, ConfigProblem
from trainwarden.plugins import plugin_groups
from trainwarden.rules.threshold import ThresholdCheck

NESTED_ITEMS: Mapping[type, dict[str, Any]] = {
    ThresholdCheck: {"name": "hot", "metric": "trainwarden_gpu_temperature_celsius"},
}
"""A minimal valid table for each dataclass that appears inside an array of tables."""

BAD_FLOATS = (math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300, -1e300)
BAD_INTS = (-1, 0, 2**63, 10**30)


@dataclasses.dataclass(frozen=True)
class NumericKey:
    """One numeric key somewhere in the config, and how to put a value there."""

    section: str  # as problems name it: "rules.threshold"
    path: str  # key path inside the section: "checks[0].for_seconds"
    kind: type
    place: typing.Callable[[Any], dict[str, Any]]  # value -> the whole config data


def _numeric_kind(tp: Any) -> type | None:
    args = typing.get_args(tp) if typing.get_origin(tp) in (types.UnionType, typing.Union) else (tp,)
    return next((a for a in args if a in (int, float)), None)


def _keys_of(
    cls: type, section: str, wrap: typing.Callable[[dict[str, Any]], dict[str, Any]], prefix: str = ""
) -> Iterator[NumericKey]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp, name = hints[field.name], field.name
        kind = _numeric_kind(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if kind is not None:
            yield NumericKey(section, f"{prefix}{name}", kind, lambda v, n=name, w=wrap: w({n: v}))
        elif origin is tuple and _numeric_kind(args[0]) is not None:
            item = _numeric_kind(args[0])
            assert item is not None
            yield NumericKey(section, f"{prefix}{name}[0]", item, lambda v, n=name, w=wrap: w({n: [v]}))
        elif origin is tuple and dataclasses.is_dataclass(args[0]):
            assert args[0] in NESTED_ITEMS, f"add a minimal valid {args[0].__name__} to NESTED_ITEMS"
            base = NESTED_ITEMS[args[0]]

            def item_wrap(
                table: dict[str, Any], n: str = name, w: Any = wrap, b: dict[str, Any] = base
            ) -> dict[str, Any]:
                return w({n: [{**b, **table}]})

            yield from _keys_of(args[0], section, item_wrap, f"{prefix}{name}[0].")
        elif origin is Mapping and _numeric_kind(args[1]) is not None:
            value_kind = _numeric_kind(args[1])
            assert value_kind is not None
            yield NumericKey(
                section, f"{prefix}{name}.eval", value_kind, lambda v, n=name, w=wrap: w({n: {"eval": v}})
            )
        elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
            yield from _keys_of(tp, f"{section}.{name}", lambda t, n=name, w=wrap: w({n: t}))


def all_numeric_keys() -> list[NumericKey]:
    """Every numeric key of [daemon], [policy], [webhook] and every collector, rule and healer."""
    keys: list[NumericKey] = []
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            keys.extend(_keys_of(tp, field.name, lambda t, s=field.name: {s: t}))
    for group, registry in plugin_groups().items():
        for name, options_cls in registry.items():
            keys.extend(_keys_of(options_cls, f"{group}.{name}", lambda t, g=group, n=name: {g: {n: t}}))
    return keys


KEYS = all_numeric_keys()


def _about(problem: ConfigProblem, key: NumericKey) -> bool:
    """Filed under this key, or a relation filed under its partner whose reason names this key."""
    if problem.section != key.section:
        return False
    return problem.key == key.path or key.path.rsplit(".", 1)[-1] in problem.why.split()


def test_the_walk_finds_the_keys_that_went_wrong_before() -> None:
    """The key list covers nested arrays of tables, mappings and arrays (where messages went wrong)."""
    paths = {(k.section, k.path) for k in KEYS}
    assert ("rules.threshold", "checks[0].for_seconds") in paths
    assert ("rules.stall", "phase_default_seconds.eval") in paths
    assert ("rules.stall", "min_phase_samples") in paths
    assert ("rules.spike", "baseline_points") in paths
    assert ("collectors.training", "allowed_uids[0]") in paths
    assert len(KEYS) > 100


def _problems(data: dict[str, Any]) -> list[ConfigProblem] | None:
    """The problems loading `data` reports, or None when it is accepted."""
    try:
        config_from_dict(data, plugin_groups(), "test.toml")
    except ConfigError as exc:
        return exc.problems
    return None


@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"{k.section}:{k.path}")
def test_every_bad_number_is_refused_under_its_own_key(key: NumericKey) -> None:
    """For every numeric key, each bad value that is refused is refused naming that key path; NaN and
    infinities (floats), negatives and values past 64 bits (integers) are always refused."""
    for bad in BAD_FLOATS if key.kind is float else BAD_INTS:
        problems = _problems(key.place(bad))
        if problems is None:
            always_bad = not math.isfinite(bad) if isinstance(bad, float) else not 0 <= bad < 2**63
            assert not always_bad, f"{key.section} {key.path} = {bad!r} accepted"
            continue
        found = [str(p) for p in problems]
        assert any(p.section == key.section and p.key == key.path for p in problems), (
            f"{key.section} {key.path} = {bad!r} not reported under its key: {found}"
        )
        assert all(_about(p, key) for p in problems), f"{key.path} = {bad!r} blamed others: {found}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[collectors.cpu]\ninterval_seconds = nan\n", "[collectors.cpu] interval_seconds: must be finite"),
        ("[collectors.cpu]\ninterval_seconds = inf\n", "[collectors.cpu] interval_seconds: must be finite"),
        ("[collectors.cpu]\ninterval_seconds = 1e300\n", "interval_seconds: must be at most 315360000"),
        ("[collectors.cpu]\ninterval_seconds = 0.001\n", "interval_seconds: must be >= 0.01"),
        (
            "[rules.collective_stuck]\nmin_samples = -1\n",
            "[rules.collective_stuck] min_samples: must be >= 0",
        ),
        ("[daemon]\nlisten = '127.0.0.1:9871:1'\n", "[daemon] listen: expected HOST:PORT (an IPv6 host in"),
        ("[daemon]\nlisten = '127.0.0.1:\u00b2'\n", "[daemon] listen: port must be 0-65535"),
        ("[daemon]\nlisten = '[nope]:1'\n", "[daemon] listen: 'nope' in brackets is not an IPv6"),
        ("[policy.routes]\nspike = ['no_such_healer']\n", "[policy.routes] spike: unknown healer 'no_such"),
        ("[policy]\nalert_healers = ['no_such_healer']\n", "[policy] alert_healers: unknown healer 'no_"),
        ("[policy.ladders]\npersistent = ['nope']\n", "[policy.ladders] persistent: unknown healer 'nope'"),
        (
            "[[rules.threshold.checks]]\nname = 'a'\nmetric = 'trainwarden_x'\nfor_seconds = -1\n",
            "[rules.threshold] checks[0].for_seconds: must be >= 0",
        ),
        ("[rules.spike]\nbaseline_points = 10\n", "[rules.spike] baseline_points: must be >= min_baseline"),
        ("[rules.stall]\nmin_phase_samples = 0\n", "[rules.stall] min_phase_samples: must be >= 1"),
        ("[rules.stall.phase_default_seconds]\neval = nan\n", "phase_default_seconds.eval: must be finite"),
        ("[collectors.training]\nallowed_uids = [0, 'x']\n", "allowed_uids[1]: expected int, got str 'x'"),
        ("[collectors.training]\nmax_ranks = 99999999999999999999\n", "max_ranks: must be <= 9223372036"),
        ("[collectors.cpu]\ninterval_seconds = 1" + "0" * 400 + "\n", "interval_seconds: must be finite"),
    ],
)
def test_each_case_from_the_hostile_input_report_is_refused(text: str, expected: str) -> None:
    """Every value that passed check-config and then broke the daemon is now refused, saying where."""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, plugin_groups(), "test.toml")
    found = [str(p) for p in info.value.problems]
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize("text", ["x = " + "[" * 600 + "]" * 600, "x = " + "{a = " * 400 + "1" + "}" * 400])
def test_toml_nested_too_deeply_is_a_config_error(text: str) -> None:
    """Arrays or inline tables nested hundreds deep are a ConfigError naming the file (no RecursionError)."""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, plugin_groups(), "deep.toml")
    assert (
        str(info.value)
        == "deep.toml: 1 problem(s)\n  not valid TOML: arrays or inline tables nested too deeply"
    )


def test_check_config_on_deep_toml_exits_1_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trainwarden check-config` on a nesting bomb prints one clear line and exits 1."""
    bomb = tmp_path / "bomb.toml"
    bomb.write_text("x = " + "[" * 1000 + "]" * 1000 + "\n")
    assert cli.main(["check-config", str(bomb)]) == 1
    err = capsys.readouterr().err
    assert f"{bomb}: 1 problem(s)" in err
    assert "nested too deeply" in err
    assert "Traceback" not in err


def test_daemon_start_on_deep_toml_exits_ex_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trainwarden daemon` on a nesting bomb exits 78 (no systemd restart loop) and says why."""
    bomb = tmp_path / "bomb.toml"
    bomb.write_text("[daemon]\nx = " + "{a = " * 500 + "1" + "}" * 500 + "\n")
    assert cli.main(["daemon", "--config", str(bomb)]) == cli.EX_CONFIG
    assert "nested too deeply" in capsys.readouterr().err


def test_a_fifo_config_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO in place of the config file is refused without blocking (nobody ever writes to it)."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as info:
        load_config(fifo, plugin_groups())
    assert str(info.value) == f"{fifo}: 1 problem(s)\n  not a regular file"


def test_an_oversized_config_is_refused(tmp_path: Path) -> None:
    """A config file over 1 MiB is refused rather than read into memory."""
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError) as info:
        load_config(big, plugin_groups())
    assert "larger than 1048576 bytes" in str(info.value)


def test_a_huge_string_value_is_reported_short() -> None:
    """A megabyte of text in the wrong place is named in a message of readable length."""
    with pytest.raises(ConfigError) as info:
        load_config_text("[daemon]\nwindow_seconds = '" + "x" * 1_000_000 + "'\n", plugin_groups())
    (problem,) = info.value.problems
    assert problem.key == "window_seconds"
    assert len(str(problem)) < 200


def test_listen_accepts_the_forms_people_use() -> None:
    """IPv4, bracketed IPv6, host names and port 0 stay valid under the stricter listen check."""
    for listen in ("127.0.0.1:9871", "0.0.0.0:0", "[::1]:9871", "[::]:9871", "localhost:9871", "node-07:1"):
        text = f"[daemon]\nlisten = '{listen}'\n[webhook]\nenabled = false\n"
        config = load_config_text(text, plugin_groups())
        assert config.daemon.listen == listen


def test_a_flag_that_needs_a_webhook_token_is_refused_like_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--listen 0.0.0.0:...` without a webhook token exits 78 at start, as the same key in the file would."""
    config = tmp_path / "config.toml"
    config.write_text("[policy]\nactions_enabled = false\n")
    assert cli.main(["daemon", "--config", str(config), "--listen", "0.0.0.0:0"]) == cli.EX_CONFIG
    err = capsys.readouterr().err
    assert "with the command-line flags" in err
    assert "[webhook] token_file: required when daemon.listen (0.0.0.0) is not loopback" in err
