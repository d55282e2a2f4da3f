"""Warm spares: Pythons that imported torch (and the configured modules) ahead of time, waiting for a start.

The run's pool (`warm_pool`) starts one *zygote*, `python -m trainwarden.backends.warm_spare DIR
LIFE_FD NICE MODULE…`, that imports the modules once at niceness NICE (its session's autogroup:
the kernel shares CPU between sessions first) and then forks a spare for each `fork` line on its
stdin: a fork of an imported process is ready in milliseconds, so the pool refills at once after
a restart. Each spare starts a session of its own (the default priority: a fork could never lower
an inherited niceness again), publishes `DIR/ready-PID.sock` and waits. The shim (`warm_shim`) of a
starting launcher or worker claims it and sends its command line, environment, working directory
and stdio; the spare takes them on, runs the command in its main thread as `python` would have,
and reports the exit status to the shim. It dies when its shim does (the connection hangs up),
and, before a claim, when the run does (the pool's life pipe hangs up); the zygote ends with the
run (its stdin closes). Nothing of the job's ever runs in the zygote.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

from trainwarden.backends.warm_shim import AGENT_ENV, MAX_MESSAGE, READY_PREFIX, SUFFIX

AUTOGROUP = Path("/proc/self/autogroup")


def _autogroup_nice(nice: int) -> None:
    """Set this session's autogroup niceness (without autogroups there is nothing to set)."""
    with contextlib.suppress(OSError):
        AUTOGROUP.write_text(str(nice), encoding="ascii")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(fd: int, armed: threading.Event) -> None:
    """SIGKILL this process once `fd`'s other end hangs up while `armed`; return once disarmed.

    Only hang-ups are polled for (nothing is read): the main thread reads the same socket.
    """
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        if not armed.is_set():
            return
        if any(event & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _fd, event in events):
            _die()


def _import(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            sys.stderr.write(f"trainwarden warm spare: cannot import {name}: {exc}\n")


def _receive(conn: socket.socket) -> dict[str, Any]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE + 4, 3)
    size = int.from_bytes(msg[:4], "big")
    data = msg[4:]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("the shim hung up mid-message")
        data += chunk
    if len(fds) != 3:
        raise OSError(f"expected 3 stdio fds, got {len(fds)}")
    message: dict[str, Any] = json.loads(data)
    message["fds"] = fds
    return message


def _take_on(message: dict[str, Any]) -> None:
    """Become the process the shim would have been: environment, directory, stdio, argv, sys.path."""
    os.environ.clear()
    os.environ.update(message["env"])
    if message.get("launcher"):
        os.environ[AGENT_ENV] = str(os.getpid())
    os.chdir(message["cwd"])
    for target, fd in enumerate(message["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    plan = message["plan"]
    if plan["unbuffered"] or os.environ.get("PYTHONUNBUFFERED"):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch = sys.modules.get("torch")
    if threads.isdigit() and int(threads) > 0 and torch is not None:
        torch.set_num_threads(int(threads))  # read once at torch's import, before this environment
    sys.argv = list(plan["argv"])
    script = plan["kind"] == "script"
    sys.path[0] = str(Path(plan["target"]).absolute().parent) if script else str(Path.cwd())


def _run(plan: dict[str, Any]) -> int:
    """Run the command as `__main__`; its exit status (1 after an uncaught exception, as python)."""
    # runpy warns that the module (torch.distributed.run) was imported before: in a spare, on purpose
    warnings.filterwarnings("ignore", ".*found in sys.modules after import of package", module="runpy")
    try:
        if plan["kind"] == "module":
            sys.argv[0] = plan["target"]
            runpy.run_module(plan["target"], run_name="__main__", alter_sys=True)
        elif plan["kind"] == "script":
            runpy.run_path(plan["target"], run_name="__main__")
        else:
            exec(compile(plan["target"], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - python -c
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        sys.stderr.write(f"{code}\n")
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str]) -> int:
    """The zygote: import once, then fork a spare per `fork` line on stdin (its pid on stdout) until EOF."""
    directory, life, nice = Path(argv[0]), int(argv[1]), int(argv[2])
    _autogroup_nice(nice)
    os.set_inheritable(life, False)  # noqa: FBT003 - the os API
    _import(argv[3:])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # spares are reaped by the kernel, not waited for
    for line in sys.stdin.buffer:  # EOF: the run is gone
        if line.strip() != b"fork":
            continue
        pid = os.fork()
        if pid == 0:
            raise SystemExit(_spare(directory, life))  # the interpreter exits as python would
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
    return 0


def _spare(directory: Path, life: int) -> int:
    """A forked spare: a session of its own, publish, wait for a claim, run the claimed command."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the job waits for its own children
    os.setsid()  # its own session, so its own autogroup, at the default priority
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)  # not the zygote's pipes: the pool reads those
    os.close(devnull)
    waiting = threading.Event()
    waiting.set()
    threading.Thread(target=_watch, args=(life, waiting), daemon=True, name="run-watch").start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = directory / f"staging-{os.getpid()}{SUFFIX}"
    listener.bind(str(staging))
    listener.listen(1)
    staging.rename(directory / f"{READY_PREFIX}{os.getpid()}{SUFFIX}")
    while True:
        conn, _addr = listener.accept()
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], sys.byteorder) == os.getuid():
            break
        conn.close()  # not this user's process: never run its command
    listener.close()
    armed = threading.Event()
    armed.set()
    threading.Thread(target=_watch, args=(conn.fileno(), armed), daemon=True, name="shim-watch").start()
    message = _receive(conn)
    waiting.clear()  # the job's from here on: it outlives the run as any rank would
    _take_on(message)

    def report() -> None:  # registered first, so it runs after every atexit handler of the job
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        armed.clear()
        with contextlib.suppress(OSError):
            conn.sendall(f"exit {status[0]}\n".encode())

    status = [0]
    atexit.register(report)
    conn.sendall(f"ok {os.getpid()}\n".encode())
    status[0] = _run(message["plan"])
    return status[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
