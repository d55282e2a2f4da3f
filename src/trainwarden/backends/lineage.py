"""Which processes descend from which: the supervised job's ranks are recognised by their ancestry.

A rank names its job itself (`Reporter.from_env(job="mine")`), and that name need not be the one
`trainwarden run` gave the command. What makes a rank part of the supervised job is that its
process (the pid the daemon learnt from SO_PEERCRED) descends from the supervised child; this
module walks `/proc/PID/stat` parent links (through `HostPaths`, so a fixture tree can stand in).
A process that double-forked away and was re-parented to init (or a subreaper) is not found.
The same trees are what a restart kills (`kill_tree`): the supervised child's, and each warm spare's.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Sequence

import psutil

from trainwarden.paths import HostPaths

MAX_DEPTH = 128  # deeper than any launcher nesting; bounds a walk over a pathological tree


def parent_of(pid: int, paths: HostPaths | None = None) -> int | None:
    """The parent pid from `/proc/PID/stat`, or None when the process is gone or unreadable."""
    paths = paths or HostPaths()
    try:
        raw = paths.proc(str(pid), "stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'.
    fields = raw.rpartition(")")[2].split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


def descends_from(pid: int, ancestor: int, paths: HostPaths | None = None) -> bool:
    """True when `pid` is `ancestor` or one of its descendants (walking parent links up to init)."""
    if pid <= 0 or ancestor <= 0:
        return False
    current: int | None = pid
    for _ in range(MAX_DEPTH):
        if current is None or current <= 1:
            return current == ancestor
        if current == ancestor:
            return True
        current = parent_of(current, paths)
    return False


def tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants now ([] when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, grace: float = 5.0) -> list[int]:
    """SIGKILL `pid` and every descendant (whatever session they moved to); return the pids signalled.

    A SIGSTOPped process dies of SIGKILL too; the kernel needs no cooperation from it. Returns once
    every one has exited (its memory, sockets and ports released), not once it was reaped: orphans
    are reaped by pid 1, which in a container may take a second or two (measured: 1.5-2 s here).
    """
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    exits = _exit_fds([p.pid for p in tree[1:]])  # before the kill, so a reused pid is never waited on
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # stragglers forked after the snapshot, same group
    if exits is None:
        psutil.wait_procs(tree[1:], timeout=grace)
    else:
        _wait_exited(exits, grace)
    return [p.pid for p in tree]


def _exit_fds(pids: Sequence[int]) -> list[int] | None:
    """A pidfd per process (one that is gone already needs none); None where pidfds are missing."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    fds = []
    for pid in pids:
        try:
            fds.append(pidfd_open(pid))
        except ProcessLookupError:
            continue
        except OSError:
            for fd in fds:
                os.close(fd)
            return None
    return fds


def _wait_exited(fds: list[int], grace: float) -> None:
    """Wait until every pidfd says its process exited, at most `grace` seconds; close them."""
    deadline = time.monotonic() + grace
    try:
        pending = set(fds)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            poller = select.poll()
            for fd in pending:
                poller.register(fd, select.POLLIN)
            pending -= {fd for fd, _event in poller.poll(int(left * 1000) + 1)}
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
