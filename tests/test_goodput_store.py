"""Goodput survives a daemon restart, and a damaged stored row is refused, counted and skipped."""

from __future__ import annotations

import io
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from support import wait_until
from training_support import hello
from trainwarden.daemon.app import Daemon, Overrides, load
from trainwarden.daemon.cli import print_status
from trainwarden.daemon.goodput import GoodputAccountant
from trainwarden.goodput_report import goodput_of
from trainwarden.goodput_store import GoodputStore, GoodputStoreError, totals_from_json
from trainwarden.goodput_timeline import Totals
from trainwarden.journal import JOURNAL_NAME
from trainwarden.protocol import encode
from trainwarden.store import Store


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def start(tmp_path: Path, clock: FakeClock) -> Daemon:
    overrides = Overrides(listen="127.0.0.1:0", runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    daemon = Daemon(load(None, overrides), overrides=overrides, clock=clock)
    daemon.start()
    return daemon


def goodput(daemon: Daemon) -> dict[str, Any]:
    found = goodput_of(daemon.status(), "toy")
    assert found is not None
    return found


def step_record(step: int) -> dict[str, Any]:
    return {"type": "step", "step": step, "step_seconds": 1.0}


def test_counters_continue_after_a_daemon_restart(tmp_path: Path) -> None:
    """A restarted daemon keeps the job's seconds and its high-water step: a step redone is a repeat."""
    clock = FakeClock(1000.0)
    daemon = start(tmp_path, clock)
    sock_path = tmp_path / "run" / "client.sock"

    def session() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        sock.connect(str(sock_path))
        sock.sendall(encode(hello(rank=0, world_size=1, pid=os.getpid())))
        return sock

    def send_at(sock: socket.socket, when: float, record: dict[str, Any], until: Any) -> None:
        clock.now = when
        sock.sendall(encode(record))
        wait_until(until, what=f"{record} accounted")

    try:
        sock = session()
        wait_until(lambda: goodput_of(daemon.status(), "toy") is not None, what="hello accounted")
        send_at(sock, 1001.0, step_record(1), lambda: goodput(daemon)["high_water"] == 1)
        send_at(sock, 1002.0, step_record(2), lambda: goodput(daemon)["high_water"] == 2)
        send_at(sock, 1003.0, step_record(3), lambda: goodput(daemon)["high_water"] == 3)
        db = GoodputStore(tmp_path / "state" / JOURNAL_NAME)
        wait_until(lambda: db.load()[0].get("toy", Totals()).high_water == 3, what="totals saved")
        sock.close()
    finally:
        daemon.stop()

    clock.now = 5000.0  # the daemon was down for an hour: not accounted
    daemon = start(tmp_path, clock)
    try:
        before = goodput(daemon)
        assert before["mode"] == "absent"
        assert before["seconds"]["productive"] == 2.0
        assert before["seconds"]["initialising"] == 1.0
        sock = session()  # the same process reconnects, as the client does lazily
        wait_until(lambda: goodput(daemon)["mode"] == "running", what="reconnect accounted")
        send_at(sock, 5001.0, step_record(4), lambda: goodput(daemon)["high_water"] == 4)
        send_at(sock, 5002.0, step_record(3), lambda: goodput(daemon)["steps_repeated"] == 1)
        after = goodput(daemon)
        assert after["seconds"]["productive"] == 3.0
        assert after["seconds"]["repeated"] == 1.0
        assert after["wall_seconds"] == 5.0
        assert after["ratio"] == 0.6
        shown = io.StringIO()
        print_status(daemon.status(), shown)
        row = next(line.split() for line in shown.getvalue().splitlines() if line.strip().startswith("toy "))
        assert row[:4] == ["toy", "running", "60.0%", "5.0s"]
        sock.close()
    finally:
        daemon.stop()


def test_a_damaged_row_is_skipped_counted_and_left_in_place(tmp_path: Path) -> None:
    """One unreadable row costs only its own job: the others load, the metric counts it."""
    state = tmp_path / "state"
    db = GoodputStore.in_state_dir(state)
    good = Totals(high_water=7, lead_rank=0, lead_pid=1, last_event_at=time.time())
    good.seconds["productive"] = 7.0
    db.save({"good": good}, 1.0)
    db.close()
    raw = sqlite3.connect(state / JOURNAL_NAME)
    raw.execute("INSERT INTO goodput VALUES ('bad', '{\"seconds\": {\"productive\": -1}}', 1.0)")
    raw.commit()
    raw.close()
    store = Store()
    accountant = GoodputAccountant(state, store, time.time)
    accountant.tick()
    assert accountant.timeline.jobs() == ["good"]
    assert store.value("trainwarden_goodput_store_errors_total", operation="row") == 1.0
    assert store.value("trainwarden_goodput_seconds_total", job="good", state="productive") == 7.0
    accountant.close()
    rows = sqlite3.connect(state / JOURNAL_NAME).execute("SELECT job FROM goodput ORDER BY job").fetchall()
    assert rows == [("bad",), ("good",)]


def test_an_unopenable_table_leaves_accounting_in_memory(tmp_path: Path) -> None:
    """A state directory that is a file: goodput still counts, unpersisted, and says so in a metric."""
    state = tmp_path / "state"
    state.write_text("not a directory")
    store = Store()
    accountant = GoodputAccountant(state, store, time.time)
    accountant.tick()
    assert store.value("trainwarden_goodput_store_errors_total", operation="load") == 1.0
    assert accountant.status()["persisted"] is None


ROWS = st.one_of(
    st.text(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
        ),
        max_leaves=20,
    ).map(json.dumps),
    st.fixed_dictionaries(
        {
            "seconds": st.dictionaries(st.sampled_from(["productive", "repeated", "x"]), st.floats()),
            "steps_repeated": st.integers(-2, 5) | st.text(max_size=3),
            "restarts": st.dictionaries(st.text(max_size=5), st.integers(-1, 3)),
            "high_water": st.none() | st.integers(-1, 9) | st.floats(),
        }
    ).map(json.dumps),
)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(ROWS)
def test_any_stored_text_loads_as_totals_or_is_refused_by_name(text: str) -> None:
    """Whatever a row holds, reading it yields valid totals or an error naming the job, nothing else."""
    try:
        totals = totals_from_json("toy", text)
    except GoodputStoreError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert "goodput row 'toy'" in message
        return
    assert all(v >= 0 for v in totals.seconds.values())
    assert totals.steps_repeated >= 0
