"""The shipped systemd unit: settings the daemon relies on, a command line the CLI accepts, systemd agrees."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainwarden.daemon import cli

UNIT = Path(__file__).parent.parent / "systemd" / "trainwarden.service"


def service() -> dict[str, list[str]]:
    """[Service] settings; repeated keys (DeviceAllow, ExecReload) keep every value."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_declares_notify_watchdog_restart_and_directories() -> None:
    """Type=notify with a watchdog, restart on failure (not on a bad config) and its own directories."""
    s = service()
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == [str(cli.EX_CONFIG)]
    assert s["RuntimeDirectory"] == ["trainwarden"]
    assert s["StateDirectory"] == ["trainwarden"]
    assert s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"


def test_unit_is_hardened_but_keeps_gpus_kmsg_and_scontrol_reachable() -> None:
    """ProtectSystem=strict with explicit writable paths, NoNewPrivileges, and device access for NVML."""
    s = service()
    assert s["ProtectSystem"] == ["strict"]
    assert set(s["ReadWritePaths"][0].split()) == {"/run/trainwarden", "/var/lib/trainwarden"}
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["DevicePolicy"] == ["closed"]
    assert {"/dev/nvidiactl rw", "char-nvidia* rw", "/dev/kmsg r"} <= set(s["DeviceAllow"])
    assert "PrivateDevices" not in s  # it would hide /dev/nvidia*
    assert "ProtectKernelLogs" not in s  # it would hide /dev/kmsg
    assert "PrivateNetwork" not in s  # scontrol talks to slurmctld over TCP
    assert "AF_UNIX" in s["RestrictAddressFamilies"][0]  # munge's socket


def test_exec_lines_are_commands_the_cli_accepts() -> None:
    """ExecStart and ExecReload parse with trainwarden's own argument parser."""
    s = service()
    parser = cli.build_parser()
    start = shlex.split(s["ExecStart"][0])
    assert start[0].endswith("/trainwarden")
    assert parser.parse_args(start[1:]).func is cli.run_daemon
    check = shlex.split(s["ExecReload"][0])
    assert parser.parse_args(check[1:]).func is cli.run_check_config
    assert parser.parse_args(start[1:]).config == Path(check[-1])


def test_unit_parses_as_ini() -> None:
    """The unit is well-formed INI with the three sections systemd expects."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong (binary path pointed at this environment's)."""
    binary = Path(sys.executable).parent / "trainwarden"
    unit = tmp_path / "trainwarden.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/trainwarden", str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trainwarden.service" not in result.stderr, result.stderr
