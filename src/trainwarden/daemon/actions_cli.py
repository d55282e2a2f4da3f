"""`trainwarden actions`: print the decision journal, newest last, as a table or JSON lines.

The table carries what an on-call needs without `--json`: why the policy decided (reason), the
job's exit status when a process exit was the finding, the incident folder of the action, and
what the healer reported (detail), the last two columns in full.
"""

from __future__ import annotations

import json
import time

from trainwarden.journal import Entry, Journal

_COLUMNS = (
    "time (UTC)",
    "rule",
    "subject",
    "healer",
    "decision",
    "result",
    "mode",
    "exit",
    "incident",
    "why",
)
_TEXT_WIDTH = 160


def _exit_status(entry: Entry) -> str:
    code = entry.evidence.get("exit_code")
    return "-" if code is None else str(code)


def _why(entry: Entry) -> str:
    """Reason, then the healer's detail when it says something else."""
    reason = " ".join(entry.reason.split())
    detail = " ".join(entry.detail.split())
    text = reason if not detail or detail == reason else f"{reason}: {detail}" if reason else detail
    if len(text) > _TEXT_WIDTH:
        text = text[: _TEXT_WIDTH - 1] + "…"
    return text


def _row(entry: Entry) -> tuple[str, ...]:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.time))
    mode = "dry-run" if entry.dry_run else "live"
    return (
        stamp,
        entry.rule,
        entry.subject,
        entry.healer,
        entry.decision,
        entry.result,
        mode,
        _exit_status(entry),
        entry.incident or "-",
        _why(entry),
    )


def format_actions(journal: Journal, limit: int = 50, as_json: bool = False) -> str:
    """The newest `limit` journal entries: an aligned table, or one JSON object per line."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    entries = journal.recent(limit)
    if as_json:
        return "".join(json.dumps(e.as_dict(), sort_keys=True) + "\n" for e in entries)
    if not entries:
        return f"no decisions journaled yet ({journal.path})\n"
    rows = [_COLUMNS, *(_row(e) for e in entries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"
