"""The run's pool of warm spares: pre-imported Pythons the restarted launcher and workers start in.

Warm start (`[healers.checkpoint_restart] warm_start = true` under `trainwarden run`) keeps `size`
unclaimed spares (`warm_spare`) alive, forks of one pre-imported zygote, forked again in the
background as the job claims them. The child's environment gets the pool's directory and a
`sitecustomize.py` first on PYTHONPATH (`warm_shim`), so the launcher and each of its workers hand
their start to a spare instead of importing torch again. A claimed spare is one of the job's
processes: its ranks are the job's (`owns`), and a restart kills it with the rest of the old run
(`kill_claimed`).

Files in the pool's directory (mode 0700): `staging-PID.sock` while a spare binds,
`ready-PID.sock` once it imported everything, `claimed-PID.sock` once a shim took it (renamed by
the shim, so exactly one claimer wins; the rename's time is when that rank's process "started").
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from trainwarden.backends.lineage import descends_from, kill_tree
from trainwarden.backends.warm_shim import (
    CLAIMED_PREFIX,
    DIR_ENV,
    PARENT_ENV,
    READY_PREFIX,
    SITECUSTOMIZE,
    SPARE_ENV,
    SUFFIX,
)
from trainwarden.paths import HostPaths

log = logging.getLogger(__name__)

# torch._dynamo: torch.optim's first optimizer imports it lazily, seconds of a restart otherwise
DEFAULT_MODULES = ("torch", "torch.distributed", "torch.distributed.run", "torch._dynamo", "numpy")
SITE_DIR = "site"


class WarmPool:
    """Spares kept ready for the next start of the supervised command (thread-safe).

    One zygote imports the modules once; spares are forks of it, asked for by a thread of the pool
    (the zygote answers only once its imports are done, and the run must never wait for that).
    """

    def __init__(
        self,
        directory: Path,
        *,
        size: int,
        modules: Sequence[str] = DEFAULT_MODULES,
        env: Mapping[str, str] | None = None,
        paths: HostPaths | None = None,
        nice: int = 19,
    ) -> None:
        """`size`: unclaimed spares to keep; `env`: their environment (the run's); `nice`: the zygote's."""
        self.directory = directory
        self.size = size
        self.nice = nice
        self.modules = tuple(modules)
        self._env = dict(os.environ if env is None else env)
        self._paths = paths or HostPaths()
        self._spares: set[int] = set()
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._zygote: subprocess.Popen[bytes] | None = None
        self._life: int | None = None  # write end of the pipe every unclaimed spare watches
        self._life_read: int | None = None
        self._thread: threading.Thread | None = None
        self.started = 0  # spares forked over the run's life

    def start(self) -> None:
        """Create the directory, its sitecustomize and the life pipe; start the zygote importing."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)
        site = self.directory / SITE_DIR
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        self._life_read, self._life = os.pipe()
        os.set_inheritable(self._life, False)  # noqa: FBT003 - the os API
        argv = [sys.executable, "-m", "trainwarden.backends.warm_spare", str(self.directory)]
        argv += [str(self._life_read), str(self.nice), *self.modules]
        try:
            self._zygote = subprocess.Popen(
                argv,
                env={**self._env, SPARE_ENV: "1"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(self._life_read,),
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("warm start: cannot start the spares' zygote: %s", exc)
            return
        self._thread = threading.Thread(target=self._forks, daemon=True, name="warm-pool")
        self._thread.start()

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """`env` for the supervised command: the pool's directory and its sitecustomize first on the path."""
        site = str(self.directory / SITE_DIR)
        path = env.get("PYTHONPATH", "")
        return {
            **env,
            DIR_ENV: str(self.directory),
            PARENT_ENV: str(os.getpid()),
            "PYTHONPATH": site + (os.pathsep + path if path else ""),
        }

    def _file(self, prefix: str, pid: int) -> Path:
        return self.directory / f"{prefix}{pid}{SUFFIX}"

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _reap(self) -> None:
        for pid in [p for p in self._spares if not self._alive(p)]:
            self._spares.discard(pid)
            for prefix in (READY_PREFIX, CLAIMED_PREFIX, "staging-"):
                with contextlib.suppress(OSError):
                    self._file(prefix, pid).unlink()

    def _missing(self) -> int:
        with self._lock:
            self._reap()
            unclaimed = sum(not self._file(CLAIMED_PREFIX, pid).exists() for pid in self._spares)
            return max(0, self.size - unclaimed)

    def fill(self) -> None:
        """Have spares forked until `size` are unclaimed (in the background: never waits)."""
        self._wanted.set()

    def _forks(self) -> None:
        """The pool's thread: ask the zygote for the spares missing whenever `fill` was called."""
        zygote = self._zygote
        assert zygote is not None
        assert zygote.stdin is not None
        assert zygote.stdout is not None
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._life is None:
                return
            for _ in range(self._missing()):
                try:
                    zygote.stdin.write(b"fork\n")
                    zygote.stdin.flush()
                    pid = int(zygote.stdout.readline())
                except (OSError, ValueError):
                    if self._life is not None:
                        log.warning("warm start: the spares' zygote is gone; restarts start cold")
                    return
                with self._lock:
                    self._spares.add(pid)
                    self.started += 1

    def ready(self) -> int:
        """Spares ready to be claimed now."""
        with self._lock:
            return sum(self._file(READY_PREFIX, pid).exists() for pid in self._spares)

    def claimed(self) -> list[int]:
        """Pids of the live spares a shim claimed (the job's processes now)."""
        with self._lock:
            return sorted(
                pid for pid in self._spares if self._file(CLAIMED_PREFIX, pid).exists() and self._alive(pid)
            )

    def claimed_at(self, pid: int) -> float | None:
        """When a shim claimed spare `pid` (the rename), None when it is no claimed spare."""
        with self._lock:
            if pid not in self._spares:
                return None
            try:
                return self._file(CLAIMED_PREFIX, pid).stat().st_ctime
            except OSError:
                return None

    def owns(self, pid: int) -> bool:
        """True when `pid` is a claimed spare or descends from one."""
        return any(descends_from(pid, spare, self._paths) for spare in self.claimed())

    def pids(self) -> list[int]:
        """Every live spare, claimed or not."""
        with self._lock:
            return sorted(pid for pid in self._spares if self._alive(pid))

    def kill_claimed(self, grace: float) -> list[int]:
        """SIGKILL every claimed spare and its descendants (a restart); the pids signalled."""
        killed: list[int] = []
        for pid in self.claimed():
            killed += kill_tree(pid, grace)
        with self._lock:
            self._reap()
        return killed

    def stop(self, grace: float = 10.0) -> None:
        """Kill the zygote and every spare (the run is over) and remove the directory."""
        with self._lock:
            for fd in (self._life, self._life_read):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._life = self._life_read = None
            spares = sorted(self._spares)
        self._wanted.set()
        zygote = self._zygote
        if zygote is not None:
            kill_tree(zygote.pid, grace)
            with contextlib.suppress(subprocess.TimeoutExpired):
                zygote.wait(grace)
            for pipe in (zygote.stdin, zygote.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        for pid in spares:
            kill_tree(pid, grace)
        with self._lock:
            self._reap()
        shutil.rmtree(self.directory, ignore_errors=True)
