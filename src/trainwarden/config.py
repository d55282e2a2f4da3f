"""TOML configuration read into frozen dataclasses, reporting every bad key at once.

Each collector, rule and healer declares its own options dataclass next to its code; the loader
validates `[collectors.NAME]`, `[rules.NAME]` and `[healers.NAME]` tables against them, so a new
plugin brings its config with it and nothing here changes.

This loader is the one validation check-config, start-up and SIGHUP share. Beyond each class's
own `problems()`, it holds every value to what the daemon can run: numbers finite, integers
(counts, sizes, ids) between 0 and 2**63-1, durations (`*_seconds`, `*_ms`) at most ten years;
each problem is named by its key path inside its section (`[rules.threshold] checks[0].for_seconds`).
"""
# Over 450 lines (issue 15): the loader and its [daemon]/[paths] sections in one place, so
# every section's keys are validated by one loader (next split: the TOML-to-dataclass conversion).

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import math
import os
import re
import reprlib
import socket
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from trainwarden.errors import ConfigError, ConfigProblem
from trainwarden.http_limits import HttpLimits
from trainwarden.paths import HostPaths
from trainwarden.policy_config import PolicyConfig
from trainwarden.webhook_config import WebhookConfig, listen_problems

T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:9871"
MIN_INTERVAL_SECONDS = 0.01


@dataclass(frozen=True)
class PluginOptions:
    """Options every plugin (collector, rule, healer) has."""

    enabled: bool = True

    def problems(self) -> list[tuple[str, str]]:
        """Semantic checks beyond types: (key, why) pairs; subclasses extend."""
        return []


@dataclass(frozen=True)
class CollectorOptions(PluginOptions):
    """Options every collector has: how often it runs and how long it may take."""

    interval_seconds: float = 5.0
    timeout_seconds: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        """Intervals and timeouts must be positive; an interval under 10 ms would only burn CPU."""
        found = super().problems()
        if self.interval_seconds <= 0:
            found.append(("interval_seconds", "must be > 0"))
        elif self.interval_seconds < MIN_INTERVAL_SECONDS:
            found.append(("interval_seconds", f"must be >= {MIN_INTERVAL_SECONDS}"))
        if self.timeout_seconds <= 0:
            found.append(("timeout_seconds", "must be > 0"))
        return found


@dataclass(frozen=True)
class DaemonConfig:
    """Where the daemon listens and keeps its files."""

    listen: str = DEFAULT_LISTEN
    runtime_dir: Path = Path("/run/trainwarden")
    state_dir: Path = Path("/var/lib/trainwarden")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    window_seconds: float = 600.0
    # This node's name in alerts, Slurm and the scrape config (an alert about another node's
    # workers is not this daemon's to act on); default the short hostname.
    node_name: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    # `[daemon.http]`: the HTTP server's limits per client (deadlines, sizes, connections).
    http: HttpLimits = field(default_factory=HttpLimits)

    def problems(self) -> list[tuple[str, str]]:
        """`listen` must be HOST:PORT with a valid port."""
        found: list[tuple[str, str]] = []
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}", self.node_name):
            found.append(("node_name", "must be a host name (letters, digits, '.', '_', '-')"))
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            found.append(("listen", str(exc)))
        if self.window_seconds <= 0:
            found.append(("window_seconds", "must be > 0"))
        return found


@dataclass(frozen=True)
class PathsConfig:
    """Roots of host filesystems; point them at fixture trees in tests."""

    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    devfs: Path = Path("/dev")

    def host_paths(self) -> HostPaths:
        """The injected path helper collectors use."""
        return HostPaths(procfs=self.procfs, sysfs=self.sysfs, devfs=self.devfs)


PluginGroups = Mapping[str, Mapping[str, type[PluginOptions]]]
"""Plugin group ("collectors", "rules", "healers") → plugin name → its options class."""


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration. Plugin options are filled with defaults when absent."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    plugins: Mapping[str, Mapping[str, PluginOptions]] = field(default_factory=dict)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    source: str = "<defaults>"
    webhook: WebhookConfig = field(default_factory=WebhookConfig)

    def plugin(self, group: str, name: str) -> PluginOptions:
        """Options of one plugin."""
        return self.plugins[group][name]


_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")


def parse_listen(listen: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:PORT`) into its parts; anything else is a ValueError.

    Checked strictly here so that check-config refuses what the socket would refuse at start
    (`127.0.0.1:9871:1`, an unbracketed IPv6 address, a non-ASCII digit in the port).
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"expected HOST:PORT (an IPv6 host in brackets: [::1]:9871), got {listen!r}")
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"host {host!r} is not an IP address or host name")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or int(port_text) > 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    return host, int(port_text)


# --- generic dataclass building -------------------------------------------------------------

MAX_DURATION_SECONDS = 10 * 365 * 86400.0
"""Ten years: the longest duration any key may hold. Beyond it timers and datetimes overflow."""

_INT64 = 2**63 - 1
_REPR_LIMIT = 80
_DURATION_SUFFIXES = {"_seconds": 1.0, "_ms": 1e-3}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _short_repr(value: Any) -> str:
    """`repr` cut to a readable length: a megabyte string or a deep array must not flood the error."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = _REPR_LIMIT
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


class _MismatchError(Exception):
    """A value that does not fit its declared type or range, with its key path and why."""

    def __init__(self, path: str, why: str, *, out_of_range: bool = False) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why
        self.out_of_range = out_of_range


def _wrong_type(value: Any, tp: Any, path: str) -> _MismatchError:
    why = f"expected {_type_name(tp)}, got {type(value).__name__} {_short_repr(value)}"
    return _MismatchError(path, why)


def _duration_scale(path: str) -> float | None:
    """Seconds per unit when the innermost named key of `path` is a duration (`*_seconds`, `*_ms`)."""
    for name in reversed(re.split(r"[.\[\]]+", path)):
        if not name or name.isdigit():
            continue
        for suffix, scale in _DURATION_SUFFIXES.items():
            if name.endswith(suffix):
                return scale
    return None


def _number(value: Any, tp: type, path: str) -> float:
    """Every number is finite and fits; integers are counts, sizes or ids (>= 0); durations are bounded."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (tp is int and isinstance(value, float))
    ):
        raise _wrong_type(value, tp, path)
    if tp is int:
        if value < 0:
            raise _MismatchError(path, f"must be >= 0, got {value}", out_of_range=True)
        if value > _INT64:
            raise _MismatchError(path, f"must be <= {_INT64}, got {_short_repr(value)}", out_of_range=True)
        number: float = value
    else:
        try:
            number = float(value)
        except OverflowError:
            raise _MismatchError(
                path, f"must be finite, got {_short_repr(value)}", out_of_range=True
            ) from None
        if not math.isfinite(number):
            raise _MismatchError(path, f"must be finite, got {number!r}", out_of_range=True)
    scale = _duration_scale(path)
    if scale is not None and abs(number) * scale > MAX_DURATION_SECONDS:
        why = f"must be at most {MAX_DURATION_SECONDS / scale:.0f} (ten years), got {_short_repr(value)}"
        raise _MismatchError(path, why, out_of_range=True)
    return value if tp is int else number


def _item_path(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def _convert(value: Any, tp: Any, where: _Where, path: str) -> Any:  # noqa: C901, PLR0911, PLR0912
    """`value` as type `tp`; `path` is its key path inside the section (`checks[0].for_seconds`)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        specific: list[_MismatchError] = []
        for arg in args:
            try:
                return _convert(value, arg, where, path)
            except _MismatchError as exc:  # a range or a deeper key says more than "expected X | Y"
                specific.extend([exc] if exc.out_of_range or exc.path != path else [])
        raise specific[0] if specific else _wrong_type(value, tp, path)
    if origin is Literal:
        if value in args:
            return value
        raise _wrong_type(value, tp, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(value, tp, path)
    if tp in (int, float):
        return _number(value, tp, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(value, tp, path)
    if tp is Path:
        if isinstance(value, str) and value and "\0" not in value:
            return Path(value)
        raise _wrong_type(value, tp, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise _wrong_type(value, tp, path)
        return tuple(_convert(item, args[0], where, _item_path(path, i)) for i, item in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise _wrong_type(value, tp, path)
        key_type, value_type = args
        return types.MappingProxyType(
            {
                _convert(k, key_type, where, path): _convert(v, value_type, where, _item_path(path, k))
                for k, v in value.items()
            }
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _wrong_type(value, tp, path)
        return build_dataclass(tp, value, where.section, where.problems, prefix=f"{path}.")
    raise _wrong_type(value, tp, path)


@dataclass(frozen=True)
class _Where:
    """The section being built and the list its problems go to."""

    section: str
    problems: list[ConfigProblem]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved field types of an options class (resolving string annotations is slow; reloads repeat it)."""
    return typing.get_type_hints(cls)


def build_dataclass(
    cls: type[T], table: Mapping[str, Any], section: str, problems: list[ConfigProblem], prefix: str = ""
) -> T:
    """Build `cls` from a TOML table, appending every problem found to `problems`.

    Unknown keys, wrong types, numbers out of range and failed semantic checks are all reported,
    each under its key path (`prefix` + key, e.g. `checks[0].for_seconds`); a key with a problem
    keeps its default so the remaining checks still run.
    """
    assert dataclasses.is_dataclass(cls)
    hints = _type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if key not in known:
            valid = ", ".join(sorted(known)) or "none"
            problems.append(ConfigProblem(section, path, f"unknown key (valid keys: {valid})"))
            continue
        tp = hints[key]
        try:
            if dataclasses.is_dataclass(tp) and isinstance(tp, type):
                # A sub-table is a section of its own: `[daemon.webhook] token`.
                if not isinstance(value, dict):
                    raise _wrong_type(value, tp, path)
                kwargs[key] = build_dataclass(tp, value, f"{section}.{path}", problems)
            else:
                kwargs[key] = _convert(value, tp, _Where(section, problems), path)
        except _MismatchError as exc:
            problems.append(ConfigProblem(section, exc.path, exc.why))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as exc:
        problems.append(ConfigProblem(section, prefix.removesuffix("."), str(exc)))
        obj = cls()
    check = getattr(obj, "problems", None)
    if callable(check):
        problems.extend(ConfigProblem(section, f"{prefix}{key}", why) for key, why in check())
    return obj


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this (1 MiB) is refused rather than read: no real one comes close."""


def load_config_text(text: str, groups: PluginGroups, source: str = "<config>") -> Config:
    """Parse TOML text into a `Config`; raise `ConfigError` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("", "", f"not valid TOML: {exc}")], source) from exc
    except RecursionError:
        # tomllib recurses per nested array or inline table; a few hundred `[` exhaust the stack.
        why = "not valid TOML: arrays or inline tables nested too deeply"
        raise ConfigError([ConfigProblem("", "", why)], source) from None
    return config_from_dict(data, groups, source)


def load_config(path: Path, groups: PluginGroups) -> Config:
    """Read and validate a TOML config file (a regular file of at most `MAX_CONFIG_BYTES`)."""
    try:
        text = _read_config_file(path)
    except OSError as exc:
        raise ConfigError([ConfigProblem("", "", f"cannot read: {exc.strerror or exc}")], str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem("", "", f"not UTF-8 text: {exc}")], str(path)) from exc
    except ValueError as exc:
        raise ConfigError([ConfigProblem("", "", str(exc))], str(path)) from exc
    return load_config_text(text, groups, str(path))


def _read_config_file(path: Path) -> str:
    """The file's text, from a regular file only, opened without blocking.

    A FIFO would hang check-config and a reload for ever; `/dev/zero` would be read until memory ran out.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
    return data.decode("utf-8")


def config_from_dict(data: Mapping[str, Any], groups: PluginGroups, source: str = "<config>") -> Config:
    """Validate already-parsed config data (TOML tables as dicts)."""
    problems: list[ConfigProblem] = []
    top_level = {"daemon", "paths", "policy", "webhook", *groups}
    valid_sections = ", ".join(sorted(top_level))
    problems.extend(
        ConfigProblem("", key, f"unknown section (valid: {valid_sections})")
        for key in data
        if key not in top_level
    )

    def table(name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            problems.append(ConfigProblem("", name, f"expected a table, got {type(value).__name__}"))
            return {}
        return value

    daemon = build_dataclass(DaemonConfig, table("daemon"), "daemon", problems)
    paths = build_dataclass(PathsConfig, table("paths"), "paths", problems)
    policy = build_dataclass(PolicyConfig, table("policy"), "policy", problems)
    webhook = build_dataclass(WebhookConfig, table("webhook"), "webhook", problems)
    plugins: dict[str, Mapping[str, PluginOptions]] = {}
    for group, registry in groups.items():
        given = table(group)
        for name in given:
            if name not in registry:
                valid = ", ".join(sorted(registry))
                problems.append(ConfigProblem(group, name, f"unknown {group[:-1]} (valid: {valid})"))
        options: dict[str, PluginOptions] = {}
        for name, options_cls in registry.items():
            section = f"{group}.{name}"
            plugin_table = given.get(name, {})
            if not isinstance(plugin_table, dict):
                why = f"expected a table, got {type(plugin_table).__name__}"
                problems.append(ConfigProblem(group, name, why))
                plugin_table = {}
            options[name] = build_dataclass(options_cls, plugin_table, section, problems)
        plugins[group] = types.MappingProxyType(options)
    plugins_view = types.MappingProxyType(plugins)
    config = Config(
        daemon=daemon, paths=paths, plugins=plugins_view, policy=policy, source=source, webhook=webhook
    )
    problems.extend(whole_config_problems(config, groups))
    if problems:
        raise ConfigError(problems, source)
    return config


def whole_config_problems(config: Config, groups: PluginGroups) -> list[ConfigProblem]:
    """Checks that span sections, which start-up would otherwise be the first to fail.

    The daemon runs them again after its command-line overrides (`--listen 0.0.0.0:9871` can
    make a token necessary), so a flag cannot start what check-config would refuse.
    """
    problems: list[ConfigProblem] = []
    with contextlib.suppress(ValueError):  # a bad listen is reported by DaemonConfig already
        problems.extend(listen_problems(config.webhook, parse_listen(config.daemon.listen)[0]))
    if "healers" in groups:  # the policy may name only registered healers, as it checks at start
        problems.extend(config.policy.healer_problems(groups["healers"]))
    return problems


def default_config(groups: PluginGroups) -> Config:
    """The safe defaults used when no config file is given (observe-only)."""
    return config_from_dict({}, groups, "<defaults>")
