"""What a pip user deploys: `trainwarden install systemd`, the wheel's data files and a complete sdist."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from trainwarden.daemon import cli
from trainwarden.daemon.install_cli import install_systemd

ROOT = Path(__file__).resolve().parents[1]


def exec_start(unit: Path) -> str:
    return next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))


def test_install_systemd_points_the_unit_at_this_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The unit starts this venv's trainwarden, the config lands beside it, and every path is printed."""
    assert cli.main(["install", "systemd", "--prefix", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    unit = tmp_path / "etc/systemd/system/trainwarden.service"
    config = tmp_path / "etc/trainwarden/config.toml"
    assert f"wrote: {unit}" in out
    assert f"wrote: {config}" in out
    ours = Path(sysconfig.get_path("scripts")) / "trainwarden"
    assert exec_start(unit) == f"ExecStart={ours} daemon --config /etc/trainwarden/config.toml"
    assert "/usr/local/bin/trainwarden" not in unit.read_text()
    assert config.read_bytes() == (ROOT / "examples/config.toml").read_bytes()


def test_install_again_keeps_an_edited_config_and_changes_nothing_else(tmp_path: Path) -> None:
    """Re-running is safe: an operator's config is never replaced, unchanged files are not rewritten."""
    install_systemd(tmp_path)
    config = tmp_path / "etc/trainwarden/config.toml"
    config.write_text("[policy]\nactions_enabled = true\n")
    again = {item.path: item.what for item in install_systemd(tmp_path)}
    assert again[config].startswith("kept")
    assert again[tmp_path / "etc/systemd/system/trainwarden.service"] == "unchanged"
    assert config.read_text() == "[policy]\nactions_enabled = true\n"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd itself accepts the written unit, with its ExecStart binary found."""
    install_systemd(tmp_path)
    unit = tmp_path / "etc/systemd/system/trainwarden.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [line for line in result.stderr.splitlines() if "trainwarden.service" in line]
    assert problems == [], result.stderr


def test_python_dash_m_trainwarden_is_the_cli() -> None:
    """`python -m trainwarden --version` answers like the console script."""
    result = subprocess.run(
        [sys.executable, "-m", "trainwarden", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.startswith("trainwarden ")


@pytest.mark.slow
def test_wheel_carries_unit_config_dashboards_and_rules_and_sdist_is_complete(tmp_path: Path) -> None:
    """The built wheel ships what `install systemd` needs; the sdist holds tests, fixtures, docs, LICENSE."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    (built,) = tmp_path.glob("trainwarden-*.whl")
    names = set(zipfile.ZipFile(built).namelist())
    data = "trainwarden-0.1.0.data/data/share/trainwarden/"
    assert data + "systemd/trainwarden.service" in names
    assert data + "examples/config.toml" in names
    for folder in ("dashboards", "prometheus"):
        shipped = sorted(
            p.name for p in (ROOT / folder).glob("*.json" if folder == "dashboards" else "*.yml")
        )
        assert all(data + f"{folder}/{name}" in names for name in shipped), folder
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "trainwarden/__main__.py" in names

    sdist = tmp_path / "sdist"
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(sdist)!r})"],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    (archive,) = sdist.glob("trainwarden-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "docs/CLIENT.md",
        "docs/METRICS.md",
        "tests/conftest.py",
        "tests/support.py",
        "tests/training_support.py",
        "tests/fixtures/hosts/vm_psi/expected.prom",
        "systemd/trainwarden.service",
        "examples/config.toml",
        "src/trainwarden/fixtures/nvml/h100-sxm-8gpu.json",
    ):
        assert needed in members, needed
