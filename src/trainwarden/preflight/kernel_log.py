"""XIDs in the recent kernel log whose catalog action is a GPU reset, a drain or a reboot.

The daemon's kmsg collector starts at the end of the log (it must never recount old incidents);
a preflight wants the opposite, the incidents already there, so it reads the log from its start
with the collector's own parser, feeds the same `XidLedger` and `xid` collector, and lets the
`gpu_health` rule name the recommended action. Records older than `xid_lookback_seconds` (by
the kernel's own since-boot timestamp) do not count.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.kmsg import KmsgParseError, XidLine, parse_message, parse_record
from trainwarden.collectors.xid import XidCollector
from trainwarden.config import CollectorOptions
from trainwarden.preflight.model import CheckResult, PreflightOptions, Status
from trainwarden.rules.base import RuleOptions, RuleView
from trainwarden.rules.gpu_health import GpuHealthRule
from trainwarden.store import Store
from trainwarden.xid_catalog import XidAction
from trainwarden.xid_ledger import XidLedger, XidReport, XidSource

XID = "kernel_xid"
MAX_RECORDS = 200_000
"""Bound on the records read (the ring buffer holds a few thousand; a file fixture may hold more)."""
_READ_SIZE = 16384
_BAD = frozenset({XidAction.RESET_GPU, XidAction.DRAIN, XidAction.REBOOT})


def check_kernel_xids(options: PreflightOptions) -> list[CheckResult]:
    """Fail on any recent XID NVIDIA says needs a reset, drain or reboot; unreadable log is skipped."""
    started = time.monotonic()
    path = options.paths.dev("kmsg")
    try:
        texts = list(_read_from_start(path))
    except OSError as exc:
        hint = (
            " (needs root, or CAP_SYSLOG when kernel.dmesg_restrict=1)" if exc.errno == errno.EACCES else ""
        )
        reason = f"cannot read {path}: {exc.strerror or exc}{hint}"
        return [CheckResult(XID, Status.SKIPPED, reason, time.monotonic() - started)]
    uptime = _uptime(options.paths.proc("uptime"))
    ledger = XidLedger()
    now = time.time()
    counted = malformed = 0
    for text in texts:
        try:
            record = parse_record(text)
            event = parse_message(record.message) if record is not None else None
        except KmsgParseError:
            malformed += 1
            continue
        if record is None or not isinstance(event, XidLine):
            continue
        if uptime is not None and uptime - record.usec / 1e6 > options.xid_lookback_seconds:
            continue
        counted += 1
        ledger.record(
            XidReport(XidSource.KMSG, event.xid, now, pci_bus_id=event.pci_bus_id, message=event.message)
        )
    store = Store()
    store.replace("xid", XidCollector(CollectorOptions(), CollectorContext(xid_ledger=ledger)).collect(), now)
    findings = GpuHealthRule(RuleOptions()).evaluate(RuleView(store), now)
    bad = [f for f in findings if _action(str(f.evidence.get("action", ""))) in _BAD]
    detail: dict[str, float | str] = {
        "records": float(len(texts)),
        "recent_xids": float(counted),
        "malformed": float(malformed),
    }
    window = f"the last {options.xid_lookback_seconds:g} s" if uptime is not None else "the log (no uptime)"
    took = time.monotonic() - started
    if bad:
        text = "; ".join(f.summary for f in bad)
        return [CheckResult(XID, Status.FAIL, f"{text} in {window}", took, detail)]
    reason = f"no XID needing a reset, drain or reboot in {window} ({counted} XID line(s) in all)"
    return [CheckResult(XID, Status.PASS, reason, took, detail)]


def _action(text: str) -> XidAction | None:
    try:
        return XidAction(text)
    except ValueError:
        return None


def _uptime(path: Path) -> float | None:
    try:
        return float(path.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_from_start(path: Path) -> Iterator[str]:
    """Every record of `/dev/kmsg` (one per read, from the oldest kept) or every line of a file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        device = stat.S_ISCHR(os.fstat(fd).st_mode)
        if device:
            yield from _device_records(fd)
            return
        with os.fdopen(os.dup(fd), "rb") as handle:
            for count, line in enumerate(handle):
                if count >= MAX_RECORDS:
                    return
                yield line.decode("utf-8", "replace").rstrip("\n")
    finally:
        os.close(fd)


def _device_records(fd: int) -> Iterator[str]:
    for _ in range(MAX_RECORDS):
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except BrokenPipeError:
            continue  # records overwritten while reading: go on with the oldest left
        if not data:
            return
        yield data.decode("utf-8", "replace")
