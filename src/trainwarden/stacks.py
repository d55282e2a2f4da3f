"""Capture every local rank's Python stacks before a hung job is killed, and trigger NCCL's flight recorder.

Two ways, best first:

- `py-spy dump --pid PID` when py-spy is installed and can read the target. It needs no help from
  the process (it reads its memory), so it also works on a process that handles no signal. It
  fails on some interpreters ("Failed to find python version from target process" for a pyenv
  build here); then
- faulthandler: the client registered `faulthandler.register(SIGUSR2, file=..., all_threads=True)`
  and said where the file is in its hello. The daemon sends SIGUSR2 and reads what was appended.

A SIGSTOPped process runs no signal handler: SIGUSR2 stays queued. So for a stopped rank the
daemon queues SIGUSR2, then sends SIGCONT (the pending handler runs first, at the C level, so the
dump is written even if Python code is blocked), reads the dump, and sends SIGSTOP again so the
process is left as found until the restart kills it.

NCCL's flight recorder: with `TORCH_NCCL_DEBUG_INFO_PIPE_FILE=PREFIX` set in the job, each rank's
ProcessGroupNCCL watchdog reads the FIFO `PREFIX<rank>.pipe`; writing to it makes the rank dump
its recent collectives to `TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>`. Writing never blocks here (a
FIFO without a reader is reported, not waited on).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from trainwarden.backends.base import RankProcess
from trainwarden.commands import CommandRunner

log = logging.getLogger(__name__)

STACK_SIGNAL = signal.SIGUSR2
MAX_STACK_CHARS = 256 * 1024
# faulthandler writes a dump thread by thread in many small writes from a signal handler, and a
# rank just resumed with SIGCONT on a busy node can be descheduled mid-dump for well over 100 ms
# (seen in CI: the main thread's stack was missing). The dump counts as complete once the file has
# not grown for this long.
DUMP_SETTLE_SECONDS = 0.5


@dataclass(frozen=True)
class StackCapture:
    """One rank's stacks, or why there are none."""

    rank: int
    pid: int
    method: str  # "py-spy", "faulthandler" or "none"
    text: str = ""
    error: str = ""

    def render(self) -> str:
        """The file written into an incident bundle."""
        head = f"# rank {self.rank} pid {self.pid} via {self.method}\n"
        if self.error:
            head += f"# errors: {self.error}\n"
        return head + self.text


def _is_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP}
    except psutil.NoSuchProcess:
        return False


def py_spy_dump(pid: int, runner: CommandRunner, timeout: float, program: str = "py-spy") -> tuple[str, str]:
    """(stacks, "") from `py-spy dump`, or ("", why it did not work)."""
    if shutil.which(program) is None:
        return "", f"{program} not installed"
    result = runner.run([program, "dump", "--pid", str(pid)], timeout)
    if result.ok and result.stdout.strip():
        return result.stdout, ""
    return "", f"{program}: {result.summary()}"


def faulthandler_dump(pid: int, stack_file: str, timeout: float) -> tuple[str, str]:
    """(stacks, "") by SIGUSR2 and the rank's stack file, or ("", why not)."""
    if not stack_file:
        return "", "the rank announced no stack file (client without faulthandler registration)"
    path = Path(stack_file)
    try:
        offset = path.stat().st_size
    except OSError as exc:
        return "", f"stack file {path}: {exc.strerror or exc}"
    stopped = _is_stopped(pid)
    try:
        os.kill(pid, STACK_SIGNAL)
        if stopped:
            os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return "", f"pid {pid} is gone"
    except PermissionError as exc:
        return "", f"cannot signal pid {pid}: {exc.strerror or exc}"
    try:
        return _read_growth(path, offset, timeout)
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)


def _read_growth(path: Path, offset: int, timeout: float) -> tuple[str, str]:
    """What was appended to `path` after `offset`, once it stopped growing (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    last_size, stable_since = offset, None
    while time.monotonic() < deadline:
        try:
            size = path.stat().st_size
        except OSError as exc:
            return "", f"stack file {path}: {exc.strerror or exc}"
        if size > offset and size == last_size:
            if stable_since is None:
                stable_since = time.monotonic()
            elif time.monotonic() - stable_since >= DUMP_SETTLE_SECONDS:
                break
        else:
            stable_since = None
        last_size = size
        time.sleep(0.02)
    if last_size <= offset:
        return "", f"no dump appeared in {path} within {timeout:g}s"
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read(MAX_STACK_CHARS)
    return data.decode("utf-8", "replace"), ""


def capture_stacks(
    ranks: Sequence[RankProcess],
    *,
    timeout: float = 5.0,
    runner: CommandRunner | None = None,
    py_spy: str = "py-spy",
) -> list[StackCapture]:
    """Stacks of every rank: py-spy first, faulthandler when py-spy is absent or fails."""
    runner = runner or CommandRunner()
    out = []
    for rank in sorted(ranks, key=lambda r: r.rank):
        text, spy_error = py_spy_dump(rank.pid, runner, timeout, py_spy)
        if text:
            out.append(StackCapture(rank.rank, rank.pid, "py-spy", text))
            continue
        text, fh_error = faulthandler_dump(rank.pid, rank.stack_file, timeout)
        if text:
            out.append(StackCapture(rank.rank, rank.pid, "faulthandler", text, spy_error))
            continue
        errors = f"{spy_error}; {fh_error}"
        log.warning("stacks: rank %d pid %d: %s", rank.rank, rank.pid, errors)
        out.append(StackCapture(rank.rank, rank.pid, "none", "", errors))
    return out


def trigger_flight_recorder(prefix: str, ranks: Sequence[int]) -> dict[int, str]:
    """Write to each rank's `PREFIX<rank>.pipe` so its NCCL watchdog dumps; per rank "ok" or why not."""
    results: dict[int, str] = {}
    for rank in ranks:
        pipe = Path(f"{prefix}{rank}.pipe")
        try:
            if not stat.S_ISFIFO(pipe.stat().st_mode):
                results[rank] = f"{pipe} is not a FIFO"
                continue
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            results[rank] = f"{pipe} does not exist (TORCH_NCCL_DEBUG_INFO_PIPE_FILE not set in the job?)"
            continue
        except OSError as exc:
            why = "no reader (the rank's watchdog is not running)" if exc.errno == errno.ENXIO else str(exc)
            results[rank] = f"{pipe}: {why}"
            continue
        try:
            os.write(fd, b"1\n")
            results[rank] = "ok"
        except OSError as exc:
            results[rank] = f"{pipe}: {exc.strerror or exc}"
        finally:
            os.close(fd)
    return results
