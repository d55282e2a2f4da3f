"""The SQLite journal survives re-opening, refuses duplicate action keys, and prints its entries."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from trainwarden.daemon.actions_cli import format_actions
from trainwarden.journal import Decision, Journal, JournalError


def _record(journal: Journal, time: float, action_key: str | None = "k1", result: str = "pending") -> int:
    return journal.record(
        time=time,
        rule="stall",
        subject="job=toy,rank=1",
        finding_key="stall|job=toy,rank=1|0.000",
        healer="checkpoint_restart",
        action_key=action_key,
        decision=Decision.TAKEN,
        result=result,
        dry_run=False,
        reason="rank 1 stalled",
        evidence={"elapsed_seconds": 31.5, "learned": float("nan")},
    )


def test_survives_reopen_with_outcome(tmp_path: Path) -> None:
    """A decision written and finished by one Journal is read back by a new one on the same file."""
    journal = Journal.in_state_dir(tmp_path)
    entry_id = _record(journal, 100.0)
    journal.finish(entry_id, result="applied", detail="restarted", time=101.0, incident="/x")
    journal.close()
    again = Journal.in_state_dir(tmp_path)
    entry = again.by_action_key("k1")
    assert entry is not None
    assert (entry.result, entry.detail, entry.finished, entry.incident) == (
        "applied",
        "restarted",
        101.0,
        "/x",
    )
    assert entry.evidence == {"elapsed_seconds": 31.5, "learned": "nan"}
    assert [e.id for e in again.since(50.0)] == [entry_id]
    assert again.since(100.5) == []


def test_duplicate_action_key_is_refused(tmp_path: Path) -> None:
    """The same action key cannot be journaled twice, so it cannot be applied twice."""
    journal = Journal.in_state_dir(tmp_path)
    _record(journal, 1.0)
    with pytest.raises(JournalError, match="cannot record"):
        _record(journal, 2.0)
    _record(journal, 3.0, action_key=None, result="cooldown")
    _record(journal, 4.0, action_key=None, result="cooldown")  # refusals carry no action key
    assert len(journal.recent(10)) == 3


def test_wal_and_schema_version(tmp_path: Path) -> None:
    """The database runs in WAL mode and refuses a schema newer than this code."""
    journal = Journal.in_state_dir(tmp_path)
    journal.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(JournalError, match="newer"):
        Journal.in_state_dir(tmp_path)


def test_unusable_location_is_a_clear_error(tmp_path: Path) -> None:
    """A journal path that is a directory fails with the path in the message."""
    (tmp_path / "journal.sqlite3").mkdir()
    with pytest.raises(JournalError, match=r"journal\.sqlite3"):
        Journal.in_state_dir(tmp_path)


def test_format_actions_table_and_json(tmp_path: Path) -> None:
    """The listing shows the newest entries as an aligned table, or as JSON lines."""
    journal = Journal.in_state_dir(tmp_path)
    assert "no decisions" in format_actions(journal)
    for i in range(3):
        entry_id = _record(journal, 1_700_000_000.0 + i, action_key=f"k{i}")
        journal.finish(entry_id, result="applied", detail=f"restart {i}", time=1_700_000_001.0 + i)
    table = format_actions(journal, limit=2).splitlines()
    assert table[0].split()[:3] == ["time", "(UTC)", "rule"]
    assert len(table) == 3
    assert table[1].startswith("2023-11-14 22:13:21")
    assert table[-1].endswith("restart 2")
    rows = [json.loads(line) for line in format_actions(journal, limit=5, as_json=True).splitlines()]
    assert [r["action_key"] for r in rows] == ["k0", "k1", "k2"]
    with pytest.raises(ValueError, match="limit"):
        format_actions(journal, limit=0)
