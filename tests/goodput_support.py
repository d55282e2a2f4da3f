"""The outside view of a toy job's goodput (its own step log) and the totals a daemon saved.

Shared by tests/test_goodput_run.py and bench/goodput_accuracy.py: both compare the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heal_support import JOB
from trainwarden.goodput_store import GoodputStore
from trainwarden.goodput_timeline import Totals
from trainwarden.journal import JOURNAL_NAME


@dataclass
class Outside:
    """What rank 0's step log says about the run."""

    wall: float
    productive: float
    checkpointing: float
    repeated_steps: int
    restart_gaps: list[float]


def outside(events_file: Path) -> Outside:
    """Classify every interval between two step lines the way docs/GOODPUT.md defines the states."""
    events = [json.loads(line) for line in events_file.read_text(encoding="utf-8").splitlines()]
    start = next(e for e in events if e["event"] == "start")
    done = next(e for e in events if e["event"] == "done")
    productive = checkpointing = held = 0.0
    repeated, gaps, high = 0, [], -1
    before: dict[str, Any] | None = None
    for event in events:
        if event["event"] == "checkpoint":  # saved inside the interval that ends at the next step line
            held += event["seconds"]
            checkpointing += event["seconds"]
            continue
        if event["event"] != "step":
            continue
        if before is not None:
            if event["step"] <= high:
                repeated += 1
            if event["pid"] != before["pid"]:
                gaps.append(event["time"] - before["time"])
            elif event["step"] > high:
                productive += event["time"] - before["time"] - held
        held = 0.0
        high = max(high, event["step"])
        before = event
    return Outside(done["time"] - start["time"], productive, checkpointing, repeated, gaps)


def saved(state: Path, job: str = JOB) -> Totals:
    """The job's totals as the daemon persisted them when it stopped."""
    store = GoodputStore(state / JOURNAL_NAME)
    try:
        found, problems = store.load()
    finally:
        store.close()
    assert not problems
    return found[job]
