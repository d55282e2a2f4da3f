"""Size, free and available bytes and inodes of configured paths (statvfs).

The path that matters most on a training node is the **checkpoint directory**: a full
checkpoint volume turns the next save into a crash, and a restart cannot resume from a
checkpoint that was never written. Add it under a name of your choosing::

    [collectors.disk_usage.volumes]
    root = "/"
    shm = "/dev/shm"
    checkpoints = "/scratch/ckpt"

Series are labelled by that name (`volume="checkpoints"`), never by the path, so dashboards and
alert rules stay the same across nodes whose mount points differ; the mount point itself is a label
of `trainwarden_host_filesystem_info` only (one series per volume), for joining in a query.
`/dev/shm` is watched by default because PyTorch DataLoader workers pass every batch through it, and
the daemon's state directory is added as `state` (`include_state_dir`). Device, filesystem type and
mount point come from `<procfs>/self/mountinfo`. A configured path that does not exist or cannot be
read is exported as `trainwarden_host_filesystem_readable{volume} 0` with the reason in `status()`,
and never stops the other paths. `statvfs` on a hung NFS server blocks forever, so volumes on
network filesystems (NFS, Lustre, CephFS, GPFS, BeeGFS, FUSE...) are probed in a daemon thread and
reported unreadable after `remote_probe_timeout_seconds`; local ones are probed inline (cheaper).
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import HostCollector, Parsed, read_host_file, sample
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorError
from trainwarden.model import MetricKind, MetricSpec, Sample

_LABELS = ("volume",)

SIZE = MetricSpec(
    "trainwarden_host_filesystem_size_bytes", "Size of the filesystem holding the volume.", labelnames=_LABELS
)
FREE = MetricSpec(
    "trainwarden_host_filesystem_free_bytes",
    "Free bytes, including those reserved for root.",
    labelnames=_LABELS,
)
AVAIL = MetricSpec(
    "trainwarden_host_filesystem_avail_bytes",
    "Bytes available to unprivileged writers such as the training job.",
    labelnames=_LABELS,
    window=True,
)
FILES = MetricSpec("trainwarden_host_filesystem_files", "Inodes of the filesystem.", labelnames=_LABELS)
FILES_FREE = MetricSpec(
    "trainwarden_host_filesystem_files_free",
    "Free inodes (sharded checkpoints can exhaust inodes before bytes).",
    labelnames=_LABELS,
    window=True,
)
READONLY = MetricSpec(
    "trainwarden_host_filesystem_readonly", "1 when the filesystem is mounted read-only.", labelnames=_LABELS
)
READABLE = MetricSpec(
    "trainwarden_host_filesystem_readable",
    "1 when the configured path could be examined; 0 when it is missing or unreadable (see status).",
    labelnames=_LABELS,
)
INFO = MetricSpec(
    "trainwarden_host_filesystem_info",
    "Device, filesystem type and mount point of the mount holding each volume.",
    MetricKind.INFO,
    ("volume", "device", "fstype", "mountpoint"),
)

MOUNT_REFRESH_COLLECTIONS = 12
"""Re-read mountinfo at least this often (once a minute at the default 5 s interval)."""

_VOLUME_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_ST_RDONLY = getattr(os, "ST_RDONLY", 1)


@dataclass(frozen=True, slots=True)
class VolumeStat:
    """What `statvfs` and `stat` say about a path; the device number finds its mount."""

    dev_major: int
    dev_minor: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    readonly: bool


Probe = Callable[[str], VolumeStat]
"""Examines one path; raises OSError when it is missing or unreadable. Injected so tests use fixtures."""


def probe_volume(path: str) -> VolumeStat:
    """The real probe: `os.stat` for the device, `os.statvfs` for sizes."""
    st = Path(path).stat()
    vfs = os.statvfs(path)
    return VolumeStat(
        dev_major=os.major(st.st_dev),
        dev_minor=os.minor(st.st_dev),
        frsize=vfs.f_frsize,
        blocks=vfs.f_blocks,
        bfree=vfs.f_bfree,
        bavail=vfs.f_bavail,
        files=vfs.f_files,
        ffree=vfs.f_ffree,
        readonly=bool(vfs.f_flag & _ST_RDONLY),
    )


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo: the device number, where it is mounted, its type and source."""

    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> Parsed[list[Mount]]:
    """Parse `/proc/<pid>/mountinfo` (proc(5)): optional fields end at a lone '-'."""
    mounts: list[Mount] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            separator = fields.index("-", 6)
            major_text, _colon, minor_text = fields[2].partition(":")
            mounts.append(
                Mount(
                    major=int(major_text),
                    minor=int(minor_text),
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[separator + 1],
                    source=_unescape(fields[separator + 2]),
                )
            )
        except (ValueError, IndexError):
            problems.append(
                f"line {number}: expected 'ID PARENT MAJ:MIN ROOT MOUNTPOINT ... - TYPE SOURCE ...'"
            )
    return Parsed(mounts, tuple(problems))


def _under(path: str, mountpoint: str) -> bool:
    return mountpoint in ("/", path) or path.startswith(mountpoint.rstrip("/") + "/")


def find_mount(mounts: list[Mount], path: str, stat: VolumeStat) -> Mount | None:
    """The mount holding `path`: same device number, deepest mount point containing the path.

    Matching on the device number keeps symlinked paths right; the prefix rule picks among bind
    mounts of one device, and the later of two stacked mounts wins, as the kernel shows it.
    """
    same_device = [m for m in mounts if (m.major, m.minor) == (stat.dev_major, stat.dev_minor)]
    candidates = [m for m in same_device if _under(path, m.mountpoint)] or same_device
    if not candidates:
        candidates = [m for m in mounts if _under(path, m.mountpoint)]
    best: Mount | None = None
    for mount in candidates:
        if best is None or len(mount.mountpoint) >= len(best.mountpoint):
            best = mount
    return best


def deepest_mount(mounts: list[Mount], path: str) -> Mount | None:
    """The mount whose mount point is the longest prefix of `path` (the later one on a tie)."""
    best: Mount | None = None
    for mount in mounts:
        if _under(path, mount.mountpoint) and (best is None or len(mount.mountpoint) >= len(best.mountpoint)):
            best = mount
    return best


NETWORK_FSTYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs", "9p", "afs"}
)


def is_network_fstype(fstype: str) -> bool:
    """Filesystems whose statvfs can block on a server; FUSE ones (s3fs, juicefs, sshfs...) included."""
    return fstype in NETWORK_FSTYPES or fstype == "fuse" or fstype.startswith("fuse.")


class BackgroundProbe:
    """Runs a probe in a daemon thread and waits at most a timeout, so a hung mount cannot block us.

    While a probe of a path is still stuck, no second thread is started for it: the next call
    waits on the same one again. Daemon threads, so a hung mount never blocks daemon shutdown.
    """

    def __init__(self, probe: Probe) -> None:
        self._probe = probe
        self._pending: dict[str, tuple[threading.Event, list[VolumeStat | OSError], float]] = {}

    def run(self, path: str, timeout: float) -> VolumeStat:
        """The probe's result, its OSError, or TimeoutError when it did not return in time."""
        pending = self._pending.pop(path, None)
        if pending is None:
            done = threading.Event()
            box: list[VolumeStat | OSError] = []
            thread = threading.Thread(target=self._work, args=(path, done, box), name="statvfs", daemon=True)
            thread.start()
            pending = (done, box, time.monotonic())
        done, box, started = pending
        if not done.wait(timeout):
            self._pending[path] = pending
            waited = time.monotonic() - started
            raise TimeoutError(errno.ETIMEDOUT, f"statvfs has not returned for {waited:.1f} s (hung mount?)")
        result = box[0]
        if isinstance(result, OSError):
            raise result
        return result

    def _work(self, path: str, done: threading.Event, box: list[VolumeStat | OSError]) -> None:
        try:
            box.append(self._probe(path))
        except OSError as exc:
            box.append(exc)
        except Exception as exc:  # a probe bug must still release the waiter
            box.append(OSError(errno.EIO, f"probe failed: {exc!r}"))
        finally:
            done.set()


def device_label(source: str) -> str:
    """`/dev/nvme0n1p2` → `nvme0n1p2`, matching diskstats' device names; other sources unchanged."""
    return source.removeprefix("/dev/")


def _default_volumes() -> Mapping[str, Path]:
    return MappingProxyType({"root": Path("/"), "shm": Path("/dev/shm")})  # noqa: S108 - watched, not written


@dataclass(frozen=True)
class DiskUsageOptions(CollectorOptions):
    """`volumes`: name → path to watch (add the checkpoint directory!); `include_state_dir` adds `state`.

    `remote_probe_timeout_seconds`: how long to wait for statvfs on a network filesystem before
    reporting the volume unreadable (a hung NFS server blocks statvfs indefinitely).
    """

    volumes: Mapping[str, Path] = field(default_factory=_default_volumes)
    include_state_dir: bool = True
    remote_probe_timeout_seconds: float = 2.0

    def problems(self) -> list[tuple[str, str]]:
        """Volume names must be short identifiers (they become label values); paths must be absolute."""
        found = super().problems()
        if self.remote_probe_timeout_seconds <= 0:
            found.append(("remote_probe_timeout_seconds", "must be > 0"))
        for name, path in self.volumes.items():
            if not _VOLUME_NAME.match(name):
                found.append(("volumes", f"name {name!r} must match {_VOLUME_NAME.pattern}"))
            if not path.is_absolute():
                found.append(("volumes", f"path of {name!r} must be absolute, got {str(path)!r}"))
        return found


@dataclass
class _VolumeState:
    path: str
    mountpoint: str = ""
    device: str = ""
    fstype: str = ""
    error: str = ""


class DiskUsageCollector(HostCollector):
    """statvfs of each configured volume, with the device and type of its mount."""

    name: ClassVar[str] = "disk_usage"
    Options: ClassVar[type[CollectorOptions]] = DiskUsageOptions

    def __init__(
        self, options: CollectorOptions, context: CollectorContext, *, probe: Probe = probe_volume
    ) -> None:
        super().__init__(options, context)
        self._probe = probe
        opts = options if isinstance(options, DiskUsageOptions) else DiskUsageOptions()
        volumes = dict(opts.volumes)
        if opts.include_state_dir and "state" not in volumes:
            volumes["state"] = context.state_dir
        self._volumes = {name: os.path.normpath(str(path)) for name, path in volumes.items()}
        self._state: dict[str, _VolumeState] = {}
        self._mountinfo = context.paths.proc("self", "mountinfo")
        # Resolved mounts by (path, device number). mountinfo is the costliest file read here
        # (thousands of lines on a Kubernetes node), so it is re-read only when a volume moves
        # to another device, or every MOUNT_REFRESH_COLLECTIONS collections.
        self._resolved: dict[tuple[str, int, int], Mount | None] = {}
        self._mounts: list[Mount] | None = None
        self._remote: dict[str, bool] = {}
        self._background = BackgroundProbe(probe)
        self._remote_timeout = opts.remote_probe_timeout_seconds
        self._collections = 0

    def collect(self) -> Iterable[Sample]:
        """Examine every volume; a failing one is reported as unreadable, the rest still export."""
        samples: list[Sample] = []
        self._collections += 1
        if self._collections % MOUNT_REFRESH_COLLECTIONS == 0:
            self._resolved.clear()
            self._remote.clear()
            self._mounts = None
        fresh = False
        for name, path in self._volumes.items():
            state = self._state[name] = _VolumeState(path)
            labels = (("volume", name),)
            try:
                stat = self._examine(path)
            except OSError as exc:
                state.error = f"{path}: {exc.strerror or exc}"
                samples.append(sample(READABLE, 0, labels))
                continue
            key = (path, stat.dev_major, stat.dev_minor)
            if key not in self._resolved:
                if not fresh:
                    self._mounts, fresh = self._read_mounts(), True
                self._resolved[key] = find_mount(self._mounts or [], path, stat)
            mount = self._resolved[key]
            if mount is not None:
                state.mountpoint, state.device, state.fstype = (
                    mount.mountpoint,
                    device_label(mount.source),
                    mount.fstype,
                )
            samples += [
                sample(READABLE, 1, labels),
                sample(SIZE, stat.blocks * stat.frsize, labels),
                sample(FREE, stat.bfree * stat.frsize, labels),
                sample(AVAIL, stat.bavail * stat.frsize, labels),
                sample(FILES, stat.files, labels),
                sample(FILES_FREE, stat.ffree, labels),
                sample(READONLY, 1 if stat.readonly else 0, labels),
                INFO.sample(
                    1, volume=name, device=state.device, fstype=state.fstype, mountpoint=state.mountpoint
                ),
            ]
        return [*samples, self.parse_error_sample()]

    def _examine(self, path: str) -> VolumeStat:
        """Probe inline, or, for a network filesystem that may hang, in a thread with a timeout."""
        remote = self._remote.get(path)
        if remote is None:
            if self._mounts is None:
                self._mounts = self._read_mounts()
            mount = deepest_mount(self._mounts, path)
            remote = self._remote[path] = mount is not None and is_network_fstype(mount.fstype)
        if remote:
            return self._background.run(path, self._remote_timeout)
        return self._probe(path)

    def _read_mounts(self) -> list[Mount]:
        try:
            parsed = parse_mountinfo(read_host_file(self._mountinfo))
        except CollectorError:
            # Sizes are still worth exporting without device names.
            return []
        self.note(self._mountinfo, parsed)
        return parsed.value

    def status(self) -> Mapping[str, Any]:
        """Each volume's path, mount and last error, so an on-call sees why a volume is unreadable."""
        detail = dict(super().status())
        detail["volumes"] = {
            name: {k: v for k, v in vars(state).items() if v} for name, state in self._state.items()
        }
        return detail


COLLECTOR = DiskUsageCollector
