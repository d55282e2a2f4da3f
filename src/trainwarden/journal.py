"""The decision journal: every policy decision (taken, refused, failed, gave up) in SQLite.

It lives in the state directory and survives daemon restarts, which is what keeps a restarted
daemon from repeating an action: the policy rebuilds its cooldowns, budgets and breakers from the
journal, and an action key recorded as applied is never applied again. An action is written as
`pending` *before* the healer runs and updated after, so a daemon killed mid-action still sees
that it tried. WAL mode lets `trainwarden actions` read while the daemon writes.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.errors import TrainwardenError

SCHEMA_VERSION = 1
JOURNAL_NAME = "journal.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    finding_key TEXT NOT NULL,
    healer TEXT NOT NULL,
    action_key TEXT,
    decision TEXT NOT NULL,
    result TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    evidence TEXT NOT NULL DEFAULT '{}',
    incident TEXT NOT NULL DEFAULT '',
    finished REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS decisions_action_key ON decisions(action_key) WHERE action_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS decisions_subject_time ON decisions(rule, subject, time);
CREATE INDEX IF NOT EXISTS decisions_time ON decisions(time);
"""


class JournalError(TrainwardenError):
    """The journal cannot be opened or is from an incompatible version."""


class Decision:
    """What the policy decided; `result` says how it ended."""

    TAKEN = "taken"  # a healer was called (result: pending, applied, noop, dry_run, failed)
    REFUSED = "refused"  # not acted on (result: the reason, e.g. cooldown, budget, circuit_open)
    GAVE_UP = "gave_up"  # the ladder is exhausted; alerted instead
    OBSERVED = "observed"  # no healer routed for this rule
    ALERTED = "alerted"  # an alert healer was told (after giving up or a failure)


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal row."""

    id: int
    time: float
    rule: str
    subject: str
    finding_key: str
    healer: str
    action_key: str | None
    decision: str
    result: str
    dry_run: bool
    reason: str
    detail: str
    evidence: Mapping[str, Any]
    incident: str
    finished: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "id": self.id,
            "time": self.time,
            "rule": self.rule,
            "subject": self.subject,
            "finding_key": self.finding_key,
            "healer": self.healer,
            "action_key": self.action_key,
            "decision": self.decision,
            "result": self.result,
            "dry_run": self.dry_run,
            "reason": self.reason,
            "detail": self.detail,
            "evidence": dict(self.evidence),
            "incident": self.incident,
            "finished": self.finished,
        }


def _json(evidence: Mapping[str, Any]) -> str:
    safe = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in evidence.items()}
    return json.dumps(safe, sort_keys=True, default=str)


def open_database(path: Path) -> sqlite3.Connection:
    """The journal's SQLite file as every user of it opens it: WAL, autocommit, shared across threads.

    The webhook's dedupe table lives in the same file, so both must agree on these settings.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class Journal:
    """Thread-safe access to the journal database at `path` (created with its directory if absent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = open_database(path)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                why = f"journal schema {version} is newer than this trainwarden ({SCHEMA_VERSION})"
                raise JournalError(f"{path}: {why}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise JournalError(f"{path}: cannot open journal: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> Journal:
        """The journal of a daemon whose state directory is `state_dir`."""
        return cls(state_dir / JOURNAL_NAME)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def record(
        self,
        *,
        time: float,
        rule: str,
        subject: str,
        finding_key: str,
        healer: str,
        decision: str,
        result: str,
        dry_run: bool,
        reason: str,
        action_key: str | None = None,
        detail: str = "",
        evidence: Mapping[str, Any] | None = None,
        incident: str = "",
    ) -> int:
        """Append one decision; returns its id. Raises `JournalError` on a duplicate action key."""
        finished = None if result == "pending" else time
        try:
            with self._lock:
                cursor = self._db.execute(
                    "INSERT INTO decisions (time, rule, subject, finding_key, healer, action_key, decision,"
                    " result, dry_run, reason, detail, evidence, incident, finished)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        time,
                        rule,
                        subject,
                        finding_key,
                        healer,
                        action_key,
                        decision,
                        result,
                        int(dry_run),
                        reason,
                        detail,
                        _json(evidence or {}),
                        incident,
                        finished,
                    ),
                )
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot record decision: {exc}") from exc
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def finish(self, entry_id: int, *, result: str, detail: str, time: float, incident: str = "") -> None:
        """Set the outcome of a pending action."""
        try:
            with self._lock:
                self._db.execute(
                    "UPDATE decisions SET result = ?, detail = ?, finished = ?,"
                    " incident = CASE WHEN ? = '' THEN incident ELSE ? END WHERE id = ?",
                    (result, detail, time, incident, incident, entry_id),
                )
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot finish decision {entry_id}: {exc}") from exc

    def prune(self, before: float) -> int:
        """Delete entries older than `before` (keeps the journal bounded); returns how many went."""
        try:
            with self._lock:
                cursor = self._db.execute("DELETE FROM decisions WHERE time < ?", (before,))
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot prune journal: {exc}") from exc
        return cursor.rowcount

    def by_action_key(self, action_key: str) -> Entry | None:
        """The entry of one action key, if journaled."""
        rows = self._query("SELECT * FROM decisions WHERE action_key = ?", (action_key,))
        return rows[0] if rows else None

    def since(self, time: float) -> list[Entry]:
        """Every entry at or after `time`, oldest first (the policy's memory after a restart)."""
        return self._query("SELECT * FROM decisions WHERE time >= ? ORDER BY time, id", (time,))

    def recent(self, limit: int = 50) -> list[Entry]:
        """The newest `limit` entries, oldest first."""
        rows = self._query("SELECT * FROM decisions ORDER BY time DESC, id DESC LIMIT ?", (limit,))
        return rows[::-1]

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[Entry]:
        try:
            with self._lock:
                rows = self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot read journal: {exc}") from exc
        return [_entry(row) for row in rows]


def _entry(row: tuple[Any, ...]) -> Entry:
    (id_, time, rule, subject, finding_key, healer, action_key, decision, result) = row[:9]
    dry_run, reason, detail, evidence, incident, finished = row[9:]
    try:
        parsed = json.loads(evidence)
    except json.JSONDecodeError:
        parsed = {"unparsed": evidence}
    return Entry(
        id=id_,
        time=time,
        rule=rule,
        subject=subject,
        finding_key=finding_key,
        healer=healer,
        action_key=action_key,
        decision=decision,
        result=result,
        dry_run=bool(dry_run),
        reason=reason,
        detail=detail,
        evidence=parsed if isinstance(parsed, dict) else {"value": parsed},
        incident=incident,
        finished=finished,
    )
