"""Reading files that another party may have replaced: no blocking, no symlinks, no unbounded reads.

The training client reads its control file and checkpoint manifests, files that a bug or a hostile
user may have swapped for a FIFO (an ``open`` that never returns), a symlink to ``/dev/zero`` (a
read that never ends) or a directory. These helpers refuse all of them with an `OSError` whose
message says what the path is instead.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


def open_regular_file(path: Path) -> tuple[int, os.stat_result]:
    """A descriptor of `path` and its stat, only if it is a regular file (the caller closes it).

    ``O_NONBLOCK`` makes a FIFO open at once (and then be refused), ``O_NOFOLLOW`` refuses a final
    symlink; the check is done with ``fstat`` on the open descriptor, so it cannot be raced.
    """
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link, not a regular file") from exc
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"not a regular file (mode {stat.filemode(st.st_mode)})")
    return fd, st


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; `OSError` otherwise."""
    fd, st = open_regular_file(path)
    try:
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes exceeds the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, f"grew beyond the limit of {limit} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)
