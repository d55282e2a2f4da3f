"""`trainwarden run` checks the node before starting its command, unless told --no-preflight."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import free_port


def write_config(tmp_path: Path) -> Path:
    """An observe-only config on private dirs and a port nobody answers on."""
    path = tmp_path / "config.toml"
    path.write_text(
        "[daemon]\n"
        f'listen = "127.0.0.1:{free_port()}"\n'
        f'runtime_dir = "{tmp_path / "run"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
    )
    return path


def run(tmp_path: Path, nvml: str, *flags: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`trainwarden run [flags] -- python -c 'write a marker'` on the NVML fixture `nvml`."""
    marker = tmp_path / "job-ran"
    env = {**os.environ, "TRAINWARDEN_NVML_FIXTURE": nvml}
    job = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ran')"]
    argv = [sys.executable, "-m", "trainwarden", "run", "--config", str(write_config(tmp_path)), *flags, "--"]
    done = subprocess.run([*argv, *job], env=env, capture_output=True, text=True, timeout=120, check=False)
    return done, marker


def test_run_refuses_to_start_on_a_node_with_a_lost_gpu(tmp_path: Path) -> None:
    """With a lost GPU the job is never started; run exits 1 and names the failed check."""
    done, marker = run(tmp_path, "h100-lost-gpu")
    assert done.returncode == 1, done.stderr
    assert not marker.exists()
    assert "preflight FAIL    gpu_nvml" in done.stderr
    assert "the job is not started (--no-preflight skips it)" in done.stderr


@pytest.mark.parametrize(
    ("nvml", "flags"),
    [("h100-sxm-8gpu", ()), ("h100-lost-gpu", ("--no-preflight",))],
    ids=["healthy", "skipped"],
)
def test_run_starts_the_job_when_healthy_or_told_to_skip(
    tmp_path: Path, nvml: str, flags: tuple[str, ...]
) -> None:
    """A healthy node runs the job after a passing preflight; --no-preflight runs it without one."""
    done, marker = run(tmp_path, nvml, *flags)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "ran"
    assert ("preflight PASS    gpu_nvml" in done.stderr) is not bool(flags)
    assert ((tmp_path / "state" / "preflight.json").exists()) is not bool(flags)
