"""Reading a daemon's goodput: from its /status document, over HTTP, and as lines for a terminal.

Kept free of the daemon's modules so `trainwarden status` stays instant and bench scripts can
read a job's goodput without importing the daemon.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping
from typing import Any

COLUMNS = (
    ("productive", "PRODUCTIVE"),
    ("repeated", "REPEATED"),
    ("restarting", "RESTARTING"),
    ("detecting", "DETECTING"),
    ("checkpointing", "CHECKPOINT"),
    ("initialising", "INIT"),
    ("evaluating", "EVAL"),
)


def goodput_of(status: Mapping[str, Any], job: str) -> dict[str, Any] | None:
    """`job`'s goodput from a daemon's /status document, or None when the daemon has none for it.

    Keys: mode, ratio (productive / wall, None before any time), wall_seconds, open_seconds,
    seconds (per state), steps_repeated, restarts (per cause), high_water.
    """
    section = status.get("goodput")
    if not isinstance(section, dict):
        return None
    jobs = section.get("jobs")
    found = jobs.get(job) if isinstance(jobs, dict) else None
    return found if isinstance(found, dict) else None


def fetch_goodput(url: str, job: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """`job`'s goodput from the daemon at `url` (e.g. `http://127.0.0.1:9871`), via its /status."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r}: expected an http:// or https:// URL")
    with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as response:  # noqa: S310 - scheme checked above
        status = json.load(response)
    return goodput_of(status, job) if isinstance(status, dict) else None


def goodput_lines(section: Mapping[str, Any]) -> list[str]:
    """The /status goodput section as a table, one row per job (empty when no job was seen)."""
    jobs = section.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        return []
    header = ("JOB", "MODE", "GOODPUT", "WALL", *(title for _key, title in COLUMNS), "REDONE", "RESTARTS")
    rows = [header]
    for job, data in sorted(jobs.items()):
        if not isinstance(data, dict):
            continue
        seconds = data.get("seconds") or {}
        ratio = data.get("ratio")
        restarts = data.get("restarts") or {}
        rows.append(
            (
                str(job),
                str(data.get("mode", "?")),
                "-" if ratio is None else f"{float(ratio):.1%}",
                f"{float(data.get('wall_seconds', 0.0)):.1f}s",
                *(f"{float(seconds.get(key, 0.0)):.1f}s" for key, _title in COLUMNS),
                str(data.get("steps_repeated", 0)),
                ",".join(f"{cause}={n}" for cause, n in sorted(restarts.items())) or "0",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["goodput (seconds per state since the job was first seen; docs/GOODPUT.md):"]
    lines.extend(
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
    errors = section.get("errors")
    if errors:
        lines.append(f"  goodput persistence errors: {json.dumps(errors, sort_keys=True)}")
    return lines


def status_goodput_lines(status: Mapping[str, Any]) -> list[str]:
    """What `trainwarden status` prints for goodput: a blank line and the table, or nothing."""
    section = status.get("goodput")
    lines = goodput_lines(section) if isinstance(section, dict) else []
    return ["", *lines] if lines else []
