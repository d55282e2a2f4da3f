"""Goodput totals in the journal's SQLite file, so a restarted daemon continues each job's counters.

One row per job (its `Totals` as JSON) in a table of its own, written with the journal's
connection settings (`journal.open_database`). A row that cannot be read back (damaged JSON, a
wrong type, a negative count) is refused with a message naming the job and the field, counted,
and left in place untouched: the job starts from zero rather than from damaged state.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError
from trainwarden.goodput_timeline import STATES, Totals
from trainwarden.journal import JOURNAL_NAME, open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS goodput (
    job TEXT PRIMARY KEY,
    totals TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


class GoodputStoreError(TrainwardenError):
    """The goodput table cannot be read or written, or one row of it is damaged."""


def totals_from_json(job: str, text: str) -> Totals:
    """Parse one stored row; raises `GoodputStoreError` naming the job and the bad field."""
    where = f"goodput row {job!r}"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise GoodputStoreError(f"{where}: not JSON: {str(exc)[:120]}") from exc
    if not isinstance(data, dict):
        raise GoodputStoreError(f"{where}: expected an object, got {type(data).__name__}")
    seconds = _mapping(data, "seconds", where)
    totals = Totals()
    for state in STATES:
        value = seconds.get(state, 0.0)
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise GoodputStoreError(f"{where}: seconds.{state} must be a finite number >= 0")
        totals.seconds[state] = float(value)
    totals.steps_repeated = _count(data.get("steps_repeated", 0), "steps_repeated", where)
    restarts = _mapping(data, "restarts", where)
    totals.restarts = {str(k): _count(v, f"restarts.{k}", where) for k, v in restarts.items()}
    high_water = data.get("high_water")
    totals.high_water = None if high_water is None else _count(high_water, "high_water", where)
    lead_rank = data.get("lead_rank")
    totals.lead_rank = None if lead_rank is None else _count(lead_rank, "lead_rank", where)
    totals.lead_pid = _count(data.get("lead_pid", 0), "lead_pid", where)
    last = data.get("last_event_at", 0.0)
    if type(last) not in (int, float) or not math.isfinite(last):
        raise GoodputStoreError(f"{where}: last_event_at must be a finite number")
    totals.last_event_at = float(last)
    return totals


def _mapping(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise GoodputStoreError(f"{where}: {key} must be an object")
    return value


def _count(value: Any, key: str, where: str) -> int:
    if type(value) is not int or value < 0:
        raise GoodputStoreError(f"{where}: {key} must be an integer >= 0")
    return value


class GoodputStore:
    """Thread-safe load and save of every job's totals in `state_dir`'s journal file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = open_database(path)
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise GoodputStoreError(f"{path}: cannot open the goodput table: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> GoodputStore:
        """The store of a daemon whose state directory is `state_dir` (the journal's file)."""
        return cls(state_dir / JOURNAL_NAME)

    def load(self) -> tuple[dict[str, Totals], list[str]]:
        """Every readable job's totals, and one message per damaged row (those rows are skipped)."""
        try:
            with self._lock:
                rows = self._db.execute("SELECT job, totals FROM goodput ORDER BY job").fetchall()
        except sqlite3.Error as exc:
            raise GoodputStoreError(f"{self.path}: cannot read the goodput table: {exc}") from exc
        found: dict[str, Totals] = {}
        problems: list[str] = []
        for job, text in rows:
            try:
                found[str(job)] = totals_from_json(str(job), str(text))
            except GoodputStoreError as exc:
                problems.append(f"{self.path}: {exc}")
        return found, problems

    def save(self, totals: Mapping[str, Totals], now: float) -> None:
        """Write the given jobs' rows in one transaction."""
        rows = [(job, json.dumps(t.as_dict(), sort_keys=True), now) for job, t in totals.items()]
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(
                        "INSERT INTO goodput (job, totals, updated) VALUES (?, ?, ?)"
                        " ON CONFLICT(job) DO UPDATE"
                        " SET totals = excluded.totals, updated = excluded.updated",
                        rows,
                    )
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise GoodputStoreError(f"{self.path}: cannot save goodput: {exc}") from exc

    def delete(self, jobs: list[str]) -> None:
        """Drop the rows of expired jobs."""
        try:
            with self._lock:
                self._db.executemany("DELETE FROM goodput WHERE job = ?", [(job,) for job in jobs])
        except sqlite3.Error as exc:
            raise GoodputStoreError(f"{self.path}: cannot delete goodput rows: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
