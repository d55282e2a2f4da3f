"""The worker side of warm start: hand this Python's start to a pre-imported spare, then relay for it.

`trainwarden run` with warm start on puts a `sitecustomize.py` first on its child's PYTHONPATH; it
calls `main()` here while Python starts, before the script or anything heavy is imported. When this
process is the run's launcher (its parent is the run) or a worker of the launcher (LOCAL_RANK set,
its parent the launcher), it claims a ready spare of the run's pool (`warm_pool`), sends it its
command line, environment, working directory and stdio (SCM_RIGHTS), and then only relays: SIGTERM,
SIGINT and SIGHUP go to the spare, the spare's exit status becomes this process's. Whatever fails
before the spare said it took over, the process starts normally: a start is never lost. Stdlib
only, and quiet: it runs inside every Python the job starts.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

DIR_ENV = "TRAINWARDEN_WARM_DIR"
PARENT_ENV = "TRAINWARDEN_WARM_PARENT"  # the run's pid: a child of it is the launcher
AGENT_ENV = "TRAINWARDEN_WARM_AGENT"  # the launcher's pid: a LOCAL_RANK child of it is a worker
SPARE_ENV = "TRAINWARDEN_WARM_SPARE"  # set in spares: never hand a spare over
READY_PREFIX = "ready-"
CLAIMED_PREFIX = "claimed-"
SUFFIX = ".sock"
ACK_TIMEOUT_SECONDS = 30.0
MAX_MESSAGE = 1 << 20
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_FLAGS = frozenset("uBsE")  # interpreter flags a spare can honour (-u by reconfiguring stdio)


def plan(orig_argv: Sequence[str]) -> dict[str, str | list[str] | bool] | None:
    """What to run, from the interpreter's own command line; None for a form a spare cannot reproduce.

    `python [-u|-B|-s|-E…] (-m MODULE | -c CODE | SCRIPT) ARGS…`; any other option (-X, -W, -O, -I…)
    changes the interpreter itself, and the process starts normally.
    """
    args = list(orig_argv[1:])
    unbuffered = False
    while args and args[0].startswith("-") and args[0] not in {"-", "-m", "-c"}:
        letters = args[0][1:]
        if not letters or not set(letters) <= _FLAGS:
            return None
        unbuffered = unbuffered or "u" in letters
        args.pop(0)
    if not args or args[0] == "-":
        return None
    if args[0] in {"-m", "-c"}:
        if len(args) < 2:
            return None
        kind = "module" if args[0] == "-m" else "code"
        return {"kind": kind, "target": args[1], "argv": [args[0], *args[2:]], "unbuffered": unbuffered}
    return {"kind": "script", "target": args[0], "argv": args, "unbuffered": unbuffered}


def role(env: os._Environ[str] | dict[str, str]) -> str:
    """What this process is to the run: "launcher", "worker", or "" (not to be handed over)."""
    if not env.get(DIR_ENV) or env.get(SPARE_ENV):
        return ""
    parent = os.getppid()
    if env.get(PARENT_ENV) == str(parent):
        return "launcher"
    if env.get("LOCAL_RANK") is not None and env.get(AGENT_ENV) == str(parent):
        return "worker"
    return ""


def claim(directory: Path) -> socket.socket | None:
    """Connect to a ready spare, claimed by renaming its socket (one claimer wins); None when none is."""
    try:
        names = sorted(p.name for p in directory.iterdir() if p.name.startswith(READY_PREFIX))
    except OSError:
        return None
    for name in names:
        if not name.endswith(SUFFIX):
            continue
        claimed = directory / (CLAIMED_PREFIX + name.removeprefix(READY_PREFIX))
        try:
            (directory / name).rename(claimed)
        except OSError:
            continue  # another process won it
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(ACK_TIMEOUT_SECONDS)
            conn.connect(str(claimed))
        except OSError:
            conn.close()
            with contextlib.suppress(OSError):
                claimed.unlink()
            continue
        return conn
    return None


def hand_over(conn: socket.socket, what: dict[str, str | list[str] | bool], agent: bool) -> int | None:
    """Send the start to the claimed spare; its pid once it took over, None when it did not."""
    message = {
        "plan": what,
        "env": dict(os.environ),
        "cwd": str(Path.cwd()),
        "shim": os.getpid(),
        "launcher": agent,
    }
    data = json.dumps(message).encode()
    try:
        socket.send_fds(conn, [len(data).to_bytes(4, "big") + data], [0, 1, 2])
        reply = _line(conn)
    except OSError:
        return None
    if not reply.startswith("ok "):
        return None
    try:
        return int(reply.split()[1])
    except (IndexError, ValueError):
        return None


def _line(conn: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(256)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            break
    return buf.decode(errors="replace").strip()


def relay(conn: socket.socket, spare: int) -> None:
    """Forward signals to the spare until it reports its exit status; exit with it (never returns)."""
    last: list[int] = []  # signals forwarded, in order

    def forward(signum: int, _frame: FrameType | None) -> None:
        last.append(signum)
        with contextlib.suppress(OSError):
            os.kill(spare, signum)

    for signum in FORWARDED:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, forward)
    conn.settimeout(None)
    while True:
        try:
            reply = _line(conn)
            break
        except InterruptedError:
            continue
        except OSError:
            reply = ""
            break
    if reply.startswith("exit "):
        with contextlib.suppress(ValueError):
            os._exit(int(reply.split()[1]))
    # The spare died without a word (a signal): die of the signal forwarded last, else of SIGKILL.
    death = last[-1] if last else int(signal.SIGKILL)
    with contextlib.suppress(OSError, ValueError):
        signal.signal(death, signal.SIG_DFL)
    os.kill(os.getpid(), death)
    os._exit(128 + death)


def main() -> None:
    """Hand over when this process qualifies and a spare is ready; else return (a normal start)."""
    env = os.environ
    kind = role(env)
    if not kind:
        return
    if kind == "launcher":
        env[AGENT_ENV] = str(os.getpid())  # its workers (a normal start) hand over to spares
    what = plan(getattr(sys, "orig_argv", []))
    if what is None:
        return
    conn = claim(Path(env[DIR_ENV]))
    if conn is None:
        return
    spare = hand_over(conn, what, agent=kind == "launcher")
    if spare is None:
        conn.close()  # the spare sees the hang-up and exits; this process starts normally
        return
    relay(conn, spare)


def chain(own_dir: str) -> None:
    """Run the `sitecustomize` this one shadows (the next one on sys.path), as Python would have."""
    own = Path(own_dir).absolute()
    path = [p for p in sys.path if Path(p or ".").absolute() != own]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


SITECUSTOMIZE = '''"""Written by `trainwarden run` (warm start): hand this Python's start to a warm spare."""
import os as _os

try:
    from trainwarden.backends import warm_shim as _shim
except ImportError:  # another environment: start normally
    _shim = None
if _shim is not None:
    try:
        _shim.main()
    except Exception:  # a start is never lost to the shim
        pass
    _shim.chain(_os.path.dirname(_os.path.abspath(__file__)))
'''
