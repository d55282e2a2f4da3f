"""Let the daemon read this rank's Python stacks: faulthandler dumps every thread on SIGUSR2.

The file stays open for the life of the process (faulthandler writes to its descriptor from the
signal handler, with no Python code running), one file per rank and pid so ranks never interleave.
`TRAINWARDEN_STACK_DIR` picks the folder, default `<runtime_dir>/stacks`, falling back to a temp
dir when that is not writable. A program that already handles SIGUSR2 keeps its handler.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from trainwarden.protocol import socket_path_from_env

log = logging.getLogger(__name__)

STACK_DIR_ENV = "TRAINWARDEN_STACK_DIR"
_open_files: list[IO[str]] = []  # kept alive: faulthandler holds only the descriptor


def stack_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    """`$TRAINWARDEN_STACK_DIR`, else `stacks/` next to the daemon's socket."""
    env = os.environ if env is None else env
    value = env.get(STACK_DIR_ENV, "")
    return Path(value) if value else socket_path_from_env(env).parent / "stacks"


def install_stack_dump(job: str, rank: int, env: Mapping[str, str] | None = None) -> Path | None:
    """Register the SIGUSR2 dump; return the file, or None when SIGUSR2 is taken or no dir is writable."""
    if signal.getsignal(signal.SIGUSR2) not in (signal.SIG_DFL, None):
        log.info("trainwarden: SIGUSR2 already handled by the program; no stack dumps for the daemon")
        return None
    name = f"{job}.rank{rank}.{os.getpid()}.stacks.txt"
    for folder in (stack_dir_from_env(env), Path(tempfile.gettempdir()) / "trainwarden-stacks"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = (folder / name).open("a", encoding="utf-8")
        except OSError:
            continue
        faulthandler.register(signal.SIGUSR2, file=handle, all_threads=True)
        _open_files.append(handle)
        return folder / name
    log.warning("trainwarden: no writable folder for stack dumps; the daemon cannot read this rank's stacks")
    return None
