"""Which Alertmanager alerts this daemon has handled, kept in the journal's SQLite database.

Two Alertmanagers that are not clustered (or a partitioned pair) deliver the same notification
twice within a millisecond, and Alertmanager retries a delivery that timed out; a daemon restart
must not forget what it handled. The table's primary key (fingerprint, startsAt, status) makes
the claim atomic: of any number of concurrent deliveries exactly one `INSERT` inserts, in any
process that opens the same file. It lives in the journal's database file (a table of its own,
its own connection) so one state file holds every decision.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from trainwarden.daemon.webhook_payload import Alert
from trainwarden.errors import TrainwardenError
from trainwarden.journal import open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_alerts (
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    status TEXT NOT NULL,
    alertname TEXT NOT NULL,
    subject TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (fingerprint, starts_at, status)
);
CREATE INDEX IF NOT EXISTS webhook_alerts_received ON webhook_alerts(received);
"""


class SeenAlertsError(TrainwardenError):
    """The webhook's table in the journal cannot be read or written."""


class SeenAlerts:
    """Atomic claims on (fingerprint, startsAt, status), persisted in `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = open_database(path)
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise SeenAlertsError(f"{path}: cannot open the webhook's table: {exc}") from exc

    def claim(self, alert: Alert, subject: str, now: float) -> bool:
        """True for the first delivery of this alert event ever seen here, False for any repeat."""
        try:
            with self._lock:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO webhook_alerts"
                    " (fingerprint, starts_at, status, alertname, subject, received)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (*alert.dedupe_key, alert.name, subject, now),
                )
        except sqlite3.Error as exc:
            raise SeenAlertsError(f"{self.path}: cannot record alert {alert.fingerprint}: {exc}") from exc
        return cursor.rowcount == 1

    def firing(self) -> list[tuple[str, str, str]]:
        """(alertname, subject, startsAt) of alerts claimed firing and not yet resolved, oldest first."""
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT f.alertname, f.subject, f.starts_at FROM webhook_alerts f"
                    " WHERE f.status = 'firing' AND NOT EXISTS (SELECT 1 FROM webhook_alerts r"
                    " WHERE r.status = 'resolved' AND r.fingerprint = f.fingerprint"
                    " AND r.starts_at = f.starts_at) ORDER BY f.received LIMIT 1000"
                ).fetchall()
        except sqlite3.Error as exc:
            raise SeenAlertsError(f"{self.path}: cannot read the webhook's table: {exc}") from exc
        return [(str(a), str(s), str(t)) for a, s, t in rows]

    def prune(self, before: float) -> int:
        """Forget alerts received before `before` (Alertmanager stops resending long before)."""
        try:
            with self._lock:
                cursor = self._db.execute("DELETE FROM webhook_alerts WHERE received < ?", (before,))
        except sqlite3.Error as exc:
            raise SeenAlertsError(f"{self.path}: cannot prune the webhook's table: {exc}") from exc
        return cursor.rowcount

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()
