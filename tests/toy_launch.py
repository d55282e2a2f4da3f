"""Launch examples/train_toy.py under a real torchrun (or as bare ranks) and watch its output."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from support import free_port

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "examples" / "train_toy.py"


def toy_env(tmp: Path) -> dict[str, str]:
    """Environment for the toy: no daemon (socket path that does not exist), quiet threads."""
    env = dict(os.environ)
    env["TRAINWARDEN_SOCKET"] = str(tmp / "no-daemon.sock")
    env["TRAINWARDEN_CONTROL_DIR"] = str(tmp / "control")
    env["OMP_NUM_THREADS"] = "1"
    # Unbuffered is safe: the toy writes each protocol line in one write (toy_job.say), so two ranks
    # sharing torchrun's pipe never interleave within a line.
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A process group whose merged output is collected line by line on a thread."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd = cmd
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=REPO,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Block until a line matches `pattern`; fail with the output if it never does."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n" + self.output())
                self._cond.wait(min(left, 0.5))

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal torchrun and every descendant, as a node loss would.

        torchrun starts each worker in a session of its own, so the process group is not enough.
        """
        try:
            tree = [self.popen.pid] + [c.pid for c in psutil.Process(self.popen.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = [self.popen.pid]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for pid in tree[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).wait(10)

    def wait(self, timeout: float = 120.0) -> int:
        """Exit status (negative for a signal); kills the group if it overruns."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.popen.wait(10)
            raise AssertionError("process overran; output:\n" + self.output()) from None
        self._reader.join(10)
        return code

    def output(self) -> str:
        """Everything printed so far (tail)."""
        return "\n".join(self.lines[-200:])


def torchrun_command(target: list[str], nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` with `nproc` ranks on loopback, no restarts of its own."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.1",
        *target,
    ]


def torchrun(args: list[str], env: dict[str, str], nproc: int = 2) -> Proc:
    """Start the toy under torchrun with `nproc` gloo ranks."""
    return Proc(torchrun_command([str(TOY), *args], nproc), env)


def bare_ranks(args: list[str], env: dict[str, str], nproc: int = 2) -> list[Proc]:
    """Start the toy's ranks directly (env:// rendezvous), so each rank's exit status is visible."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = dict(env)
        rank_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(Proc([sys.executable, str(TOY), *args], rank_env))
    return procs


def final_sha(out: Path) -> str:
    """The parameter digest the toy wrote at the end."""
    return (out / "final.sha256").read_text(encoding="utf-8").strip()


def baseline_sha(tmp: Path, steps: int) -> str:
    """Digest of an uninterrupted torchrun run of `steps` steps that saves no checkpoint at all."""
    run = torchrun(["--steps", str(steps), "--out", str(tmp / "out")], toy_env(tmp))
    code = run.wait()
    assert code == 0, run.output()
    return final_sha(tmp / "out")
