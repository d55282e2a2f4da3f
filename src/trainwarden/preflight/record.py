"""The last preflight result, kept for the daemon to export, and one journal row per run.

The result file (`<state_dir>/preflight.json`) is written atomically (temp, fsync, rename), so
the daemon never reads half a result; reading it refuses anything that is not a small regular
file of the expected shape with a `PreflightRecordError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError
from trainwarden.journal import JOURNAL_NAME, Journal
from trainwarden.safe_files import read_regular_file

RESULT_NAME = "preflight.json"
FORMAT_VERSION = 1
MAX_RESULT_BYTES = 1 << 20
STATUSES = frozenset({"pass", "fail", "skipped"})


class PreflightRecordError(TrainwardenError):
    """A result file that cannot be used (unreadable, not JSON, wrong shape)."""


@dataclass(frozen=True, slots=True)
class StoredCheck:
    """One check as the result file holds it."""

    check: str
    status: str
    reason: str
    duration_seconds: float
    detail: Mapping[str, float | str]


@dataclass(frozen=True, slots=True)
class StoredResult:
    """The last run: when, how long, healthy or not, every check."""

    finished_at: float
    duration_seconds: float
    healthy: bool
    node: str
    checks: tuple[StoredCheck, ...]


def result_path(state_dir: Path) -> Path:
    """Where the last result lives."""
    return state_dir / RESULT_NAME


def write_result(state_dir: Path, document: Mapping[str, Any]) -> Path:
    """Atomically replace the result file with `document` (the `--json` report plus a version)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    target = result_path(state_dir)
    data = json.dumps({"format_version": FORMAT_VERSION, **document}, sort_keys=True).encode()
    fd, temp = tempfile.mkstemp(prefix=".preflight-", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temp).replace(target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


def read_result(state_dir: Path) -> StoredResult | None:
    """The last result, None when there is none; `PreflightRecordError` when it is unusable."""
    path = result_path(state_dir)
    try:
        raw = read_regular_file(path, MAX_RESULT_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PreflightRecordError(f"{path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise PreflightRecordError(f"{path}: not JSON ({exc})") from exc
    return _parse(data, path)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PreflightRecordError(f"{where}: expected a finite number, got {str(value)[:40]!r}")
    return float(value)


def _parse(data: object, path: Path) -> StoredResult:
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise PreflightRecordError(f"{path}: not a version {FORMAT_VERSION} preflight result")
    checks = data.get("checks")
    if not isinstance(checks, list):
        raise PreflightRecordError(f"{path}: 'checks' must be a list")
    parsed = []
    for index, item in enumerate(checks):
        where = f"{path}: checks[{index}]"
        if not isinstance(item, dict):
            raise PreflightRecordError(f"{where}: must be an object")
        name, status, reason = item.get("check"), item.get("status"), item.get("reason", "")
        if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
            raise PreflightRecordError(f"{where}.check: must be a short identifier")
        if status not in STATUSES:
            raise PreflightRecordError(f"{where}.status: must be one of {sorted(STATUSES)}")
        detail = item.get("detail", {})
        if not isinstance(detail, dict) or not isinstance(reason, str):
            raise PreflightRecordError(f"{where}: 'detail' must be an object and 'reason' text")
        clean = {
            str(k): v
            for k, v in detail.items()
            if isinstance(v, str | int | float) and not isinstance(v, bool)
        }
        parsed.append(
            StoredCheck(name, str(status), reason, _number(item.get("duration_seconds", 0.0), where), clean)
        )
    healthy = data.get("healthy")
    if not isinstance(healthy, bool):
        raise PreflightRecordError(f"{path}: 'healthy' must be true or false")
    return StoredResult(
        finished_at=_number(data.get("finished_at"), f"{path}: finished_at"),
        duration_seconds=_number(data.get("duration_seconds"), f"{path}: duration_seconds"),
        healthy=healthy,
        node=str(data.get("node", "")),
        checks=tuple(parsed),
    )


def previous_detail(state_dir: Path, check: str) -> dict[str, float | str]:
    """The detail a check recorded last time (its baselines); empty when there is none or it is unusable."""
    try:
        result = read_result(state_dir)
    except PreflightRecordError:
        return {}
    if result is None:
        return {}
    for item in result.checks:
        if item.check == check:
            return {k: float(v) if isinstance(v, int) else v for k, v in item.detail.items()}
    return {}


def journal_run(state_dir: Path, document: Mapping[str, Any]) -> None:
    """One `preflight` row in the decision journal (never a taken action, so no policy counts it)."""
    failed = [c for c in document["checks"] if c["status"] == "fail"]
    reason = "; ".join(f"{c['check']}: {c['reason']}" for c in failed) or "all checks passed or skipped"
    job = str(document.get("after_job") or "")
    subject = f"node={document['node']}" + (f",job={job}" if job else "")
    if job:
        reason = f"after job {job} ended: {reason}"
    journal = Journal(state_dir / JOURNAL_NAME)
    try:
        journal.record(
            time=float(document["finished_at"]),
            rule="preflight",
            subject=subject,
            finding_key=f"preflight:{document['node']}:{document['finished_at']}",
            healer="preflight",
            decision="checked",
            result="healthy" if document["healthy"] else "unhealthy",
            dry_run=False,
            reason=reason[:2000],
            evidence={c["check"]: c["status"] for c in document["checks"]},
        )
    finally:
        journal.close()
