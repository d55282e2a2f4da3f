"""Capture every local rank's Python stacks before a hung job is killed, and trigger NCCL's flight recorder.

A rank is left as it was found: a running rank keeps running, and a SIGSTOPped rank stays stopped
through the whole capture (it must not train a single further step before the restart kills it).

- `py-spy dump --pid PID` when py-spy is installed (the `stacks` extra) and can read the target.
  It needs no help from the process (it reads its memory). For a running rank py-spy pauses it
  with ptrace for the read and resumes it; for a stopped rank it runs with `--nonblocking`, which
  only reads memory (`process_vm_readv`), never attaches, and so never resumes it. (Without
  `--nonblocking` py-spy 0.4 fails on a stopped process: "Failed to suspend process".)
- faulthandler, for a running rank only: the client registered
  `faulthandler.register(SIGUSR2, file=..., all_threads=True)` and said where the file is in its
  hello. The daemon sends SIGUSR2 and reads what was appended.
- A stopped rank without py-spy: a stopped process runs no signal handler, and resuming it to let
  the faulthandler dump would let it run on. So it is not signalled at all; the capture records
  the kernel's view instead (each thread's state, `wchan` and, where readable, `/proc/PID/task/TID/stack`)
  and says that Python stacks need py-spy.

NCCL's flight recorder: with `TORCH_NCCL_DEBUG_INFO_PIPE_FILE=PREFIX` set in the job, each rank's
ProcessGroupNCCL watchdog reads the FIFO `PREFIX<rank>.pipe`; writing to it makes the rank dump
its recent collectives to `TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>`. Writing never blocks here (a
FIFO without a reader is reported, not waited on).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainwarden.commands import CommandRunner
from trainwarden.model import RankProcess
from trainwarden.paths import HostPaths

log = logging.getLogger(__name__)

STACK_SIGNAL = signal.SIGUSR2
MAX_STACK_CHARS = 256 * 1024
MAX_KERNEL_THREADS = 256
# faulthandler writes a dump thread by thread in many small writes from a signal handler, and a
# rank on a busy node can be descheduled mid-dump for well over 100 ms (seen in CI: the main
# thread's stack was missing). The dump counts as complete once the file has not grown for this long.
DUMP_SETTLE_SECONDS = 0.5
_STOPPED_STATES = frozenset({"T", "t"})
STOPPED_NOTE = (
    "the rank is stopped (SIGSTOP) and was left stopped: it was not signalled or resumed, "
    "so without py-spy there are no Python stacks (install py-spy: the `stacks` extra)"
)


@dataclass(frozen=True)
class StackCapture:
    """One rank's stacks, or why there are none."""

    rank: int
    pid: int
    method: str  # "py-spy", "faulthandler", "kernel" or "none"
    text: str = ""
    error: str = ""
    stopped: bool = False

    def render(self) -> str:
        """The file written into an incident bundle."""
        head = f"# rank {self.rank} pid {self.pid} via {self.method}\n"
        if self.stopped:
            head += "# process was stopped (SIGSTOP) and was left stopped during the capture\n"
        if self.error:
            head += f"# errors: {self.error}\n"
        return head + self.text


def process_state(pid: int, paths: HostPaths | None = None) -> str:
    """The one-letter state from `/proc/PID/stat` ("R", "S", "T", …), or "" when the process is gone."""
    paths = paths or HostPaths()
    try:
        raw = paths.proc(str(pid), "stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ')'.
    _, _, rest = raw.rpartition(")")
    fields = rest.split()
    return fields[0] if fields else ""


def is_stopped(pid: int, paths: HostPaths | None = None) -> bool:
    """True for a process in job-control stop (SIGSTOP) or a tracing stop."""
    return process_state(pid, paths) in _STOPPED_STATES


def default_py_spy() -> str:
    """py-spy on PATH, else the one installed beside this interpreter (a venv not on PATH)."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def py_spy_dump(
    pid: int, runner: CommandRunner, timeout: float, program: str = "py-spy", *, nonblocking: bool = False
) -> tuple[str, str]:
    """(stacks, "") from `py-spy dump` (`--nonblocking`: read only, never attach), or ("", why not)."""
    if shutil.which(program) is None:
        return "", f"{program} not installed"
    argv = [program, "dump", "--pid", str(pid)]
    if nonblocking:
        argv.append("--nonblocking")
    result = runner.run(argv, timeout)
    if result.ok and result.stdout.strip():
        return result.stdout, ""
    return "", f"{program}: {result.summary()}"


def kernel_view(pid: int, paths: HostPaths | None = None) -> tuple[str, str]:
    """Each thread's state, wait channel and kernel stack from /proc (no signal sent), or ("", why not)."""
    paths = paths or HostPaths()
    try:
        tids = sorted(int(t.name) for t in paths.proc(str(pid), "task").iterdir() if t.name.isdigit())
    except OSError as exc:
        return "", f"/proc/{pid}/task: {exc.strerror or exc}"
    lines: list[str] = []
    for tid in tids[:MAX_KERNEL_THREADS]:
        task = paths.proc(str(pid), "task", str(tid))
        comm = _read(task / "comm").strip() or "?"
        state = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in _read(task / "status").splitlines()
                if ln.startswith("State:")
            ),
            "?",
        )
        wchan = _read(task / "wchan").strip() or "?"
        lines.append(f"Thread {tid} ({comm}) state {state} wchan {wchan}")
        try:
            stack = (task / "stack").read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            lines.append(f"    (kernel stack not readable: {exc.strerror or exc})")
        else:
            lines.extend(f"    {frame}" for frame in stack.splitlines())
    if len(tids) > MAX_KERNEL_THREADS:
        lines.append(f"... {len(tids) - MAX_KERNEL_THREADS} more thread(s)")
    return "\n".join(lines) + "\n", ""


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def faulthandler_dump(pid: int, stack_file: str, timeout: float) -> tuple[str, str]:
    """(stacks, "") by SIGUSR2 and the rank's stack file, or ("", why not); never signals a stopped rank."""
    if not stack_file:
        return "", "the rank announced no stack file (client without faulthandler registration)"
    if is_stopped(pid):
        return "", f"pid {pid} is stopped: its faulthandler cannot run without resuming it"
    path = Path(stack_file)
    try:
        offset = path.stat().st_size
    except OSError as exc:
        return "", f"stack file {path}: {exc.strerror or exc}"
    try:
        os.kill(pid, STACK_SIGNAL)
    except ProcessLookupError:
        return "", f"pid {pid} is gone"
    except PermissionError as exc:
        return "", f"cannot signal pid {pid}: {exc.strerror or exc}"
    return _read_growth(path, offset, timeout)


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
    py_spy: str | None = None,
) -> list[StackCapture]:
    """Every rank's stacks, each left as found: py-spy, else faulthandler (running) or /proc (stopped)."""
    runner = runner or CommandRunner()
    program = py_spy or default_py_spy()
    out = []
    for rank in sorted(ranks, key=lambda r: r.rank):
        stopped = is_stopped(rank.pid)
        text, spy_error = py_spy_dump(rank.pid, runner, timeout, program, nonblocking=stopped)
        if text:
            out.append(StackCapture(rank.rank, rank.pid, "py-spy", text, stopped=stopped))
            continue
        if stopped:
            text, proc_error = kernel_view(rank.pid)
            errors = "; ".join(e for e in (spy_error, STOPPED_NOTE, proc_error) if e)
            log.warning("stacks: rank %d pid %d: %s", rank.rank, rank.pid, errors)
            out.append(
                StackCapture(rank.rank, rank.pid, "kernel" if text else "none", text, errors, stopped=True)
            )
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
