"""The checkpoint volume: examined by the daemon's disk_usage collector, then one timed write.

Free space and read-only state come from the same statvfs the daemon exports; the write probe
writes `write_probe_bytes` to one temporary file in the checkpoint directory, fsyncs it and
removes it (the only thing a preflight ever writes outside its own state directory).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.disk_usage import AVAIL, READABLE, READONLY, DiskUsageCollector, DiskUsageOptions
from trainwarden.preflight.model import GIB, MIB, CheckResult, PreflightOptions, Status
from trainwarden.store import Store

SPACE = "checkpoint_space"
WRITE = "checkpoint_write"
_VOLUME = "checkpoints"
_CHUNK = MIB


def check_volume(options: PreflightOptions) -> list[CheckResult]:
    """Free space above the floor, writable, and a write throughput above the floor."""
    directory = options.checkpoint_dir
    if directory is None:
        why = "no checkpoint directory given (--checkpoint-dir)"
        return [CheckResult(SPACE, Status.SKIPPED, why), CheckResult(WRITE, Status.SKIPPED, why)]
    space, usable = _space(options, directory)
    if not usable:
        return [
            space,
            CheckResult(WRITE, Status.SKIPPED, "the volume cannot be written (see checkpoint_space)"),
        ]
    return [space, _write(options, directory)]


def _space(options: PreflightOptions, directory: Path) -> tuple[CheckResult, bool]:
    started = time.monotonic()
    context = CollectorContext(paths=options.paths, state_dir=options.state_dir)
    collector = DiskUsageCollector(
        DiskUsageOptions(volumes={_VOLUME: directory}, include_state_dir=False), context
    )
    store = Store()
    store.replace("disk_usage", collector.collect(), time.time())
    took = time.monotonic() - started
    if store.value(READABLE.name, volume=_VOLUME) != 1.0:
        error = collector.status().get("volumes", {}).get(_VOLUME, {}).get("error", str(directory))
        return CheckResult(SPACE, Status.FAIL, f"cannot read the checkpoint volume: {error}", took), False
    if store.value(READONLY.name, volume=_VOLUME) == 1.0:
        return CheckResult(SPACE, Status.FAIL, f"{directory} is on a read-only filesystem", took), False
    avail = store.value(AVAIL.name, volume=_VOLUME) or 0.0
    detail: dict[str, float | str] = {"avail_bytes": avail, "min_free_bytes": float(options.min_free_bytes)}
    text = f"{avail / GIB:.1f} GiB free in {directory} (floor {options.min_free_bytes / GIB:.1f} GiB)"
    status = Status.PASS if avail >= options.min_free_bytes else Status.FAIL
    return CheckResult(SPACE, status, text, took, detail), True


def _write(options: PreflightOptions, directory: Path) -> CheckResult:
    """Write, fsync, remove one temp file; throughput counts the fsync (what a checkpoint waits for)."""
    block = os.urandom(_CHUNK)
    size = options.write_probe_bytes
    started = time.monotonic()
    try:
        fd, name = tempfile.mkstemp(prefix=".trainwarden-preflight-", dir=directory)
    except OSError as exc:
        return CheckResult(WRITE, Status.FAIL, f"cannot create a file in {directory}: {exc.strerror or exc}")
    try:
        written = 0
        while written < size:
            written += os.write(fd, block[: min(_CHUNK, size - written)])
        os.fsync(fd)
    except OSError as exc:
        return CheckResult(WRITE, Status.FAIL, f"write to {directory} failed: {exc.strerror or exc}")
    finally:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
    took = max(time.monotonic() - started, 1e-9)
    rate = size / took
    floor = options.min_write_bytes_per_second
    detail: dict[str, float | str] = {"bytes_per_second": rate, "min_bytes_per_second": floor}
    text = f"{size / MIB:g} MiB written and synced at {rate / MIB:.0f} MiB/s (floor {floor / MIB:g} MiB/s)"
    return CheckResult(WRITE, Status.PASS if rate >= floor else Status.FAIL, text, took, detail)
