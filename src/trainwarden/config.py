"""TOML configuration read into frozen dataclasses, reporting every bad key at once.

Each collector, rule and healer declares its own options dataclass next to its code; the loader
validates `[collectors.NAME]`, `[rules.NAME]` and `[healers.NAME]` tables against them, so a new
plugin brings its config with it and nothing here changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from trainwarden.daemon.webhook_config import WebhookConfig, listen_problems
from trainwarden.errors import ConfigError, ConfigProblem
from trainwarden.healers.policy_config import PolicyConfig
from trainwarden.paths import HostPaths

T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:9871"


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
        """Intervals and timeouts must be positive."""
        found = super().problems()
        if self.interval_seconds <= 0:
            found.append(("interval_seconds", "must be > 0"))
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


def parse_listen(listen: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:PORT`) into its parts."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    return host, int(port_text)


# --- generic dataclass building -------------------------------------------------------------


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


class _MismatchError(Exception):
    """A value that does not fit its declared type."""


def _convert(value: Any, tp: Any, section: str, problems: list[ConfigProblem]) -> Any:  # noqa: C901, PLR0911, PLR0912
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in args:
            try:
                return _convert(value, arg, section, problems)
            except _MismatchError:
                continue
        raise _MismatchError
    if origin is Literal:
        if value in args:
            return value
        raise _MismatchError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _MismatchError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _MismatchError
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _MismatchError
    if tp is str:
        if isinstance(value, str):
            return value
        raise _MismatchError
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
        raise _MismatchError
    if origin is tuple:
        if not isinstance(value, list):
            raise _MismatchError
        item_type = args[0]
        return tuple(_convert(item, item_type, section, problems) for item in value)
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise _MismatchError
        key_type, value_type = args
        return types.MappingProxyType(
            {
                _convert(k, key_type, section, problems): _convert(v, value_type, section, problems)
                for k, v in value.items()
            }
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _MismatchError
        return build_dataclass(tp, value, section, problems)
    raise _MismatchError


def build_dataclass(cls: type[T], table: Mapping[str, Any], section: str, problems: list[ConfigProblem]) -> T:
    """Build `cls` from a TOML table, appending every problem found to `problems`.

    Unknown keys, wrong types and failed semantic checks are all reported; a key with a problem
    keeps its default so the remaining checks still run.
    """
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            valid = ", ".join(sorted(known)) or "none"
            problems.append(ConfigProblem(section, key, f"unknown key (valid keys: {valid})"))
            continue
        tp = hints[key]
        nested = dataclasses.is_dataclass(tp) and isinstance(tp, type)
        try:
            kwargs[key] = _convert(value, tp, f"{section}.{key}" if nested else section, problems)
        except _MismatchError:
            why = f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
            problems.append(ConfigProblem(section, key, why))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(ConfigProblem(section, "", str(exc)))
        obj = cls()
    check = getattr(obj, "problems", None)
    if callable(check):
        problems.extend(ConfigProblem(section, key, why) for key, why in check())
    return obj


def load_config_text(text: str, groups: PluginGroups, source: str = "<config>") -> Config:
    """Parse TOML text into a `Config`; raise `ConfigError` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("", "", f"not valid TOML: {exc}")], source) from exc
    return config_from_dict(data, groups, source)


def load_config(path: Path, groups: PluginGroups) -> Config:
    """Read and validate a TOML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", "", f"cannot read: {exc.strerror or exc}")], str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem("", "", f"not UTF-8 text: {exc}")], str(path)) from exc
    return load_config_text(text, groups, str(path))


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
    with contextlib.suppress(ValueError):  # a bad listen is reported by DaemonConfig already
        problems.extend(listen_problems(webhook, parse_listen(daemon.listen)[0]))
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
    if problems:
        raise ConfigError(problems, source)
    plugins_view = types.MappingProxyType(plugins)
    return Config(
        daemon=daemon, paths=paths, plugins=plugins_view, policy=policy, source=source, webhook=webhook
    )


def default_config(groups: PluginGroups) -> Config:
    """The safe defaults used when no config file is given (observe-only)."""
    return config_from_dict({}, groups, "<defaults>")
