"""Warm start: restarted launchers and workers start in pre-imported spares, with real torchrun and gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from heal_support import start_run, taken
from toy_launch import baseline_sha, final_sha
from trainwarden.backends.restart_stages import read_journal
from trainwarden.backends.warm_pool import WarmPool
from trainwarden.backends.warm_shim import DIR_ENV, PARENT_ENV, READY_PREFIX, SITECUSTOMIZE
from trainwarden.daemon.run_cli import STAGES_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WARM = """
[healers.checkpoint_restart]
warm_start = true
warm_nice = 0
"""


def _wait(what: str, check: object, timeout: float = 120.0) -> None:
    """Wait for `check()` to hold (an event, polled; never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _spares_of(directory: Path) -> list[psutil.Process]:
    """Live spare processes of the pool at `directory`."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "trainwarden.backends.warm_spare" in cmdline and str(directory) in cmdline:
            out.append(proc)
    return out


def _ready(directory: Path) -> int:
    try:
        return sum(p.name.startswith(READY_PREFIX) for p in directory.iterdir())
    except OSError:
        return 0


def test_a_killed_rank_restarts_in_warm_spares_and_resumes_exactly(tmp_path: Path) -> None:
    """A SIGKILLed rank: the restarted launcher and both workers start in spares, the job ends with the
    parameters of an uninterrupted run, and no spare outlives the run."""
    steps = 400
    expected = baseline_sha(tmp_path / "baseline", steps)
    toy = ["--steps", str(steps), "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "5"]
    toy += ["--step-sleep", "0.05", "--out", str(tmp_path / "out")]
    run = start_run(tmp_path, toy, extra=WARM)
    pool = tmp_path / "run" / f"warm-{run.proc.popen.pid}"
    run.proc.wait_for(r"^STEP 5 ", 120)
    _wait("three ready spares", lambda: _ready(pool) >= 3)
    os.kill(run.rank_pid(1), signal.SIGKILL)
    run.proc.wait_for(r"action_applied\s+checkpoint_restart applied for process_gone", 60)
    assert run.proc.wait(200) == 0, run.proc.output()
    assert final_sha(tmp_path / "out") == expected
    assert [r.result for r in taken(run.journal(), "checkpoint_restart")] == ["applied"]
    [restart] = read_journal(run.state / STAGES_FILE)
    assert restart["notes"] == {"warm_ranks": 2}, restart  # both ranks of the new run started warm
    assert restart["first_step_after"] is not None
    assert not _spares_of(pool)
    assert not pool.exists()


def _site(tmp: Path) -> Path:
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return site


def test_the_shim_starts_normally_when_no_spare_answers(tmp_path: Path) -> None:
    """A stale `ready` socket nobody listens on, then an empty pool: the command runs itself, once."""
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / f"{READY_PREFIX}999999.sock").write_text("", encoding="utf-8")  # not a listening socket
    env = {
        **os.environ,
        DIR_ENV: str(pool),
        PARENT_ENV: str(os.getpid()),
        "PYTHONPATH": f"{_site(tmp_path)}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    code = "import os, sys; print('ran in', os.getpid()); sys.exit(3)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.count("ran in") == 1
    assert not list(pool.iterdir())  # the stale one was claimed and removed; nothing else was there


def test_a_spare_runs_the_command_with_its_stdio_and_status_and_dies_with_its_shim(tmp_path: Path) -> None:
    """A claimed spare writes to the shim's stdout, exits with its status, dies when its shim is killed."""
    pool = WarmPool(tmp_path / "pool", size=1, modules=("json",), nice=0)
    pool.start()
    pool.fill()
    try:
        env = pool.child_env(dict(os.environ))
        _wait("a ready spare", lambda: pool.ready() == 1)
        [spare] = pool.pids()
        code = "import os, sys; print('ran in', os.getpid()); sys.exit(7)"
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 7, proc.stderr
        assert proc.stdout.strip() == f"ran in {spare}"
        _wait(
            "the spare's exit",
            lambda: not psutil.pid_exists(spare) or psutil.Process(spare).status() == "zombie",
        )
        pool.fill()
        _wait("a fresh spare", lambda: pool.ready() == 1)
        [spare] = pool.pids()
        shim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
        _wait("the claim", lambda: pool.claimed() == [spare])
        assert pool.owns(spare)
        shim.kill()
        shim.wait()
        _wait("the orphaned spare's death", lambda: spare not in pool.claimed())
        assert not psutil.pid_exists(spare) or psutil.Process(spare).status() == "zombie"
    finally:
        pool.stop()
    assert not _spares_of(tmp_path / "pool")
