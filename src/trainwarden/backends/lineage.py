"""Which processes descend from which: the supervised job's ranks are recognised by their ancestry.

A rank names its job itself (`Reporter.from_env(job="mine")`), and that name need not be the one
`trainwarden run` gave the command. What makes a rank part of the supervised job is that its
process (the pid the daemon learnt from SO_PEERCRED) descends from the supervised child; this
module walks `/proc/PID/stat` parent links (through `HostPaths`, so a fixture tree can stand in).
A process that double-forked away and was re-parented to init (or a subreaper) is not found.
"""

from __future__ import annotations

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
