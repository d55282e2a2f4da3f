"""Incident bundles: one folder per action with everything an on-call needs to judge it.

`<state_dir>/incidents/<UTC time>-<rule>-<healer>-<id>/` holds `finding.json` (rule, subject,
summary, evidence), `windows.json` (the recent history of the subject's windowed series),
`action.json` and `result.json`; other healers add files such as stacks later (`add_file`).
A bundle is assembled in a hidden temp folder and renamed into place, so readers never see half
of one. Only the newest `keep` bundles are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainwarden.model import Action, ActionResult, Finding
from trainwarden.store import Point

INCIDENTS_DIR = "incidents"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    return value


def _dump(path: Path, data: Any) -> None:
    text = json.dumps(_safe(data), indent=2, sort_keys=True, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


class IncidentWriter:
    """Writes bundles under `<state_dir>/incidents`."""

    def __init__(self, state_dir: Path, keep: int = 200) -> None:
        self.root = state_dir / INCIDENTS_DIR
        self.keep = keep

    def write(
        self,
        finding: Finding,
        action: Action,
        result: ActionResult,
        windows: Mapping[str, Sequence[Point]],
        now: float,
    ) -> Path:
        """Write one bundle and return its folder; raises OSError when the disk refuses."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        digest = hashlib.sha256(action.key.encode()).hexdigest()[:8]
        name = _UNSAFE.sub("_", f"{stamp}-{finding.rule}-{action.healer}-{digest}")
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _dump(
                tmp / "finding.json",
                {
                    "rule": finding.rule,
                    "subject": dict(finding.subject),
                    "severity": finding.severity.value,
                    "state": finding.state.value,
                    "summary": finding.summary,
                    "since": finding.since,
                    "source": finding.source,
                    "evidence": dict(finding.evidence),
                },
            )
            _dump(
                tmp / "windows.json",
                {series: [[p.timestamp, p.value] for p in points] for series, points in windows.items()},
            )
            _dump(
                tmp / "action.json",
                {
                    "healer": action.healer,
                    "key": action.key,
                    "reason": action.reason,
                    "subject": dict(action.subject),
                    "params": dict(action.params),
                    "time": now,
                },
            )
            _dump(
                tmp / "result.json",
                {"outcome": result.outcome.value, "detail": result.detail, "data": dict(result.data)},
            )
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    @staticmethod
    def add_file(bundle: Path, name: str, text: str) -> Path:
        """Add one more file to a bundle (e.g. stacks captured by a restart healer)."""
        safe = _UNSAFE.sub("_", name)
        path = bundle / safe
        path.write_text(text, encoding="utf-8")
        return path

    def _prune(self) -> None:
        bundles = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in bundles[: max(0, len(bundles) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
