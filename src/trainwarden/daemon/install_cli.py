"""`trainwarden install systemd`: put what the package ships where a node needs it.

The wheel carries the systemd unit, the example config and, when the project has them, the
Grafana dashboards and Prometheus rules, as data files under `<environment>/share/trainwarden/`
(in a source checkout they are read from the checkout itself). This command writes:

- `<prefix>/etc/systemd/system/trainwarden.service`, with `ExecStart` and `ExecReload` pointing at
  the `trainwarden` of the environment that runs this command (a venv works without editing);
- `<prefix>/etc/trainwarden/config.toml`, only when absent: an operator's config is never replaced;
- `<prefix>/usr/local/share/trainwarden/{dashboards,prometheus}/…`, to import into Grafana and
  load into Prometheus.

It prints every path with what it did, and never runs systemctl itself.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from trainwarden.errors import TrainwardenError

UNIT_NAME = "trainwarden.service"
SHIPPED_BINARY = "/usr/local/bin/trainwarden"
EXTRA_DIRS = ("dashboards", "prometheus")
EXTRA_SUFFIXES = (".json", ".yml", ".yaml")
"""Dashboards and rules, not the code that generates them (a checkout also holds that)."""


class InstallError(TrainwardenError):
    """The shipped files cannot be found, or a target cannot be written."""


@dataclass(frozen=True)
class Written:
    """One target path and what happened to it: wrote, unchanged, or kept (an existing config)."""

    path: Path
    what: str


def shipped_root() -> Path:
    """Where the shipped files are: the installed data files, else the source checkout."""
    candidates = (
        Path(sysconfig.get_path("data")) / "share" / "trainwarden",
        Path(sys.prefix) / "share" / "trainwarden",
        Path(__file__).resolve().parents[3],  # src/trainwarden/daemon/install_cli.py in a checkout
    )
    for root in candidates:
        if (root / "systemd" / UNIT_NAME).is_file():
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise InstallError(f"the shipped systemd unit is missing (looked in {tried}); reinstall trainwarden")


def trainwarden_command() -> str:
    """The `trainwarden` script of the running environment, as systemd must start it."""
    script = Path(sysconfig.get_path("scripts")) / "trainwarden"
    program = script if script.is_file() else Path(sys.executable)
    if any(c.isspace() for c in str(program)):
        raise InstallError(f"{program} contains whitespace, which an ExecStart= line cannot hold as is")
    return str(script) if script.is_file() else f"{sys.executable} -m trainwarden"


def render_unit(template: str, command: str) -> str:
    """The shipped unit with this environment's trainwarden in ExecStart/ExecReload."""
    if SHIPPED_BINARY not in template:
        raise InstallError(f"the shipped unit names no {SHIPPED_BINARY} to replace")
    header = f"# Written by `trainwarden install systemd` for {command}.\n"
    return header + template.replace(SHIPPED_BINARY, command)


def _write(path: Path, content: bytes, *, replace: bool) -> Written:
    try:
        if path.exists():
            if path.read_bytes() == content:
                return Written(path, "unchanged")
            if not replace:
                return Written(path, "kept (exists; not replaced)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content)
        tmp.replace(path)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return Written(path, "wrote")


def install_systemd(prefix: Path, root: Path | None = None, command: str | None = None) -> list[Written]:
    """Write the unit, the config (if absent) and the shipped extras under `prefix`."""
    root = root or shipped_root()
    command = command or trainwarden_command()
    unit = render_unit((root / "systemd" / UNIT_NAME).read_text(encoding="utf-8"), command)
    done = [_write(prefix / "etc" / "systemd" / "system" / UNIT_NAME, unit.encode(), replace=True)]
    config = root / "examples" / "config.toml"
    if config.is_file():
        target = prefix / "etc" / "trainwarden" / "config.toml"
        done.append(_write(target, config.read_bytes(), replace=False))
    share = prefix / "usr" / "local" / "share" / "trainwarden"
    for name in EXTRA_DIRS:
        source = root / name
        found = source.rglob("*") if source.is_dir() else ()
        files = sorted(p for p in found if p.is_file() and p.suffix in EXTRA_SUFFIXES)
        done.extend(_write(share / name / f.relative_to(source), f.read_bytes(), replace=True) for f in files)
    return done
