"""Fuzzing the config surface: whatever the file holds, loading returns a Config or raises ConfigError,
and every config it accepts starts the real daemon's parts (HTTP, collectors, scheduler, rules, policy,
healers) without raising. Seeded and bounded; TRAINWARDEN_FUZZ_EXAMPLES raises the count for a longer hunt."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from fuzz_support import fuzz
from trainwarden.config import Config, config_from_dict, load_config_text
from trainwarden.daemon.app import Daemon, Overrides
from trainwarden.errors import ConfigError
from trainwarden.plugins import plugin_groups

FUZZ = fuzz(1 / 3)
EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"
HOST = Path(__file__).parent / "fixtures" / "hosts" / "vm_psi"
GROUPS = plugin_groups()


def _load_text(text: str) -> Config | None:
    """The config, or None for a ConfigError; anything else escapes and fails the test."""
    try:
        return load_config_text(text, GROUPS, "fuzz.toml")
    except ConfigError:
        return None


def _load_data(data: dict[str, Any]) -> Config | None:
    try:
        return config_from_dict(data, GROUPS, "fuzz.toml")
    except ConfigError:
        return None


# --- values of every shape TOML can hold --------------------------------------------------------

SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "127.0.0.1:0", "[::1]:1", "a:b:c", "/tmp", "trainwarden_x", "clip", "\0"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _sections() -> list[tuple[tuple[str, ...], type]]:
    """(path of the table, its dataclass) for [daemon], [policy], ... and every plugin's table."""
    hints = typing.get_type_hints(Config)
    found = [
        ((f.name,), hints[f.name])
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(hints[f.name], type)
    ]
    found.extend(((group, name), cls) for group, registry in GROUPS.items() for name, cls in registry.items())
    return found


SECTIONS = _sections()


def _plausible(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the declared type, mostly in range, so that many documents are accepted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*(_plausible(a) for a in args if a is not type(None)))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if tp is bool:
        return st.booleans()
    if tp is int:  # plus the odd value the loader must refuse rather than hand to the daemon
        return st.integers(min_value=0, max_value=5000) | st.sampled_from([-1, 2**64])
    if tp is float:
        edges = [0.0, 0.5, 0.99, 1.0, 1.5, 1e-300, 1e300, math.nan, math.inf]
        return st.floats(min_value=0.01, max_value=1e5) | st.sampled_from(edges)
    if tp is str:
        return st.text(max_size=12) | st.sampled_from(["", "x", "localhost:1", "https://127.0.0.1:1/"])
    if tp is Path:
        return st.sampled_from(["/tmp/trainwarden-fuzz", "/nonexistent/dir", "relative"])
    if origin is tuple:
        return st.lists(_plausible(args[0]), max_size=3)
    if origin is Mapping:
        return st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), _plausible(args[1]), max_size=2)
    return VALUES


@st.composite
def documents(draw: st.DrawFn, *, plausible: bool) -> dict[str, Any]:
    """A config as parsed TOML: some known tables, some known keys, sometimes an unknown one."""
    data: dict[str, Any] = {}
    for path, cls in draw(st.lists(st.sampled_from(SECTIONS), max_size=6, unique=True)):
        hints = typing.get_type_hints(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        table: dict[str, Any] = {}
        for name in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
            table[name] = draw(_plausible(hints[name]) if plausible else VALUES)
        if not plausible and draw(st.booleans()):
            table[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = table
    if plausible:  # keep the parts this machine can run: loopback only, no webhook token needed
        data.setdefault("webhook", {})["enabled"] = False
    return data


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    """The shipped example with a few characters replaced, inserted or removed."""
    text = EXAMPLE.read_text(encoding="utf-8")
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        cut = draw(st.integers(min_value=0, max_value=8))
        insert = draw(st.text(alphabet='[]{}=",.\n#0123456789naif-+e_ \\', max_size=12))
        text = text[:at] + insert + text[at + cut :]
    return text


# --- loading never raises anything but ConfigError ----------------------------------------------


@FUZZ
@given(st.text(max_size=400))
def test_any_text_loads_or_is_a_config_error(text: str) -> None:
    """Random text loads, or fails with ConfigError only (never a traceback of another kind)."""
    config = _load_text(text)
    assert config is None or isinstance(config, Config)


@FUZZ
@given(mutated_example())
def test_a_mutated_example_loads_or_is_a_config_error(text: str) -> None:
    """The shipped example with random edits (brackets, digits, nan, inf) loads or is a ConfigError."""
    config = _load_text(text)
    assert config is None or isinstance(config, Config)


@FUZZ
@given(documents(plausible=False))
def test_any_document_loads_or_is_a_config_error(data: dict[str, Any]) -> None:
    """Any tables, keys and values of any TOML shape are a Config or a ConfigError, never a crash."""
    config = _load_data(data)
    assert config is None or isinstance(config, Config)


# --- what is accepted can run -------------------------------------------------------------------


@fuzz(1 / 24)
@given(data=documents(plausible=True))
def test_every_accepted_config_starts_the_daemons_parts(data: dict[str, Any], tmp_path_factory: Any) -> None:
    """An accepted config starts the real daemon on loopback (collectors, scheduler phases, rules,
    policy, healers, webhook) and stops it, without raising."""
    config = _load_data(data)
    assume(config is not None)
    assert config is not None
    root = tmp_path_factory.mktemp("fuzz")
    overrides = Overrides(
        listen="127.0.0.1:0",
        runtime_dir=root / "run",
        state_dir=root / "state",
        procfs=HOST / "proc",
        sysfs=HOST / "sys",
    )
    config = overrides.apply(config)
    config = dataclasses.replace(config, paths=dataclasses.replace(config.paths, devfs=root / "dev"))
    daemon = Daemon(config, overrides=overrides)
    try:
        daemon.start()
        assert daemon.address[1] > 0
        assert math.isfinite(daemon.status()["uptime_seconds"])
    finally:
        daemon.stop()
