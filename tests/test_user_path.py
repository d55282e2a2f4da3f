"""The new user's path, end to end: the built wheel in a fresh venv, the README's script, a crash, a heal.

Nothing here runs from the checkout: the wheel is built and installed (not editable) into a new
venv; only torch and the other dependencies are borrowed from the project's venv (one `.pth`
line, so nothing is downloaded and the checkout's own `src` is never on the path). The daemon and
the job run from a directory outside the repository, with the config the README shows, and the
job is the README's "Instrument your training loop" script, extracted verbatim. A SIGKILL from
outside the job is the crash; the job must be restarted, resume from its checkpoint and finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import psutil
import pytest

from support import wait_until
from test_docs import readme_example

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 100


def fresh_venv(tmp: Path) -> Path:
    """A venv holding the built wheel, and the project venv's dependencies (torch...) on its path."""
    dist = tmp / "dist"
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
            str(dist),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("trainwarden-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    # Appended after the venv's own site-packages, and not a site dir: the project venv's
    # editable-install .pth (which would put the checkout's src first) is not processed.
    (Path(purelib) / "borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    return venv


def test_wheel_user_instruments_the_readme_script_and_a_crash_is_healed(tmp_path: Path) -> None:
    """Installed from the wheel, run as README says, a job killed from outside is restarted and finishes."""
    venv = fresh_venv(tmp_path)
    home = tmp_path / "home"  # the user's own directory, outside the repository
    home.mkdir()
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import trainwarden; print(trainwarden.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=home,
        timeout=60,
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout

    (home / "train.py").write_text(readme_example())
    (home / "heal.toml").write_text("[policy]\nactions_enabled = true\n")  # as the README's printf writes it
    ckpt = home / "train-ckpt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINWARDEN_", "PYTHONPATH", "RANK"))}
    log = home / "run.log"
    command = [
        str(venv / "bin" / "trainwarden"),
        "run",
        "--config",
        "heal.toml",
        "--job",
        "train",
        "--listen",
        "127.0.0.1:0",
        "--runtime-dir",
        str(home / "tw" / "run"),
        "--state-dir",
        str(home / "tw" / "state"),
        "--",
        str(venv / "bin" / "python"),
        "train.py",
        "--steps",
        str(STEPS),
        "--ckpt-dir",
        str(ckpt),
    ]
    with log.open("wb") as sink:
        run = subprocess.Popen(command, cwd=home, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:

        def job() -> psutil.Process | None:
            for child in psutil.Process(run.pid).children(recursive=True):
                try:
                    if "train.py" in child.cmdline():
                        return child
                except psutil.Error:
                    continue
            return None

        wait_until(lambda: run.poll() is not None or any(ckpt.glob("step_*")), 300.0, "the first checkpoint")
        assert run.poll() is None, log.read_text()
        first = job()
        assert first is not None, log.read_text()
        first.send_signal(signal.SIGKILL)  # a crash, from outside the job
        rc = run.wait(600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    output = log.read_text()
    assert rc == 0, output
    assert "resumed after step" in output, output
    assert "not reachable" not in output  # the script found the daemon through trainwarden run's variables
    assert f"done: trained up to step {STEPS - 1}" in output, output
    actions = subprocess.run(
        [str(venv / "bin" / "trainwarden"), "actions", "--state-dir", str(home / "tw" / "state")],
        capture_output=True,
        text=True,
        check=True,
        cwd=home,
        timeout=60,
    ).stdout
    restarts = [line for line in actions.splitlines() if "checkpoint_restart" in line and " applied " in line]
    assert len(restarts) == 1, actions  # one fault, one action
