"""The daemon's training collector over a real Unix socket: metrics, peer checks and bad input."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from training_support import (
    collect_into,
    connect,
    hello,
    received,
    rejected,
    running_collector,
    send,
    wait_until,
)
from trainwarden.collectors import collector_classes
from trainwarden.collectors.training import TrainingCollector
from trainwarden.control import ClipSettings, ControlFileError, ControlState
from trainwarden.daemon.exporter import make_registry
from trainwarden.errors import CollectorError
from trainwarden.model import labels_of
from trainwarden.protocol import Reason, encode

RANK0 = labels_of(job="toy", rank="0")


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_collector_is_registered() -> None:
    """The training collector is in the collector registry under the name `training`."""
    assert collector_classes()["training"] is TrainingCollector


def test_step_records_become_the_contract_metrics(tmp_path: Path) -> None:
    """Hello + steps + a phase + a checkpoint produce the documented series with the sent values."""
    with running_collector(tmp_path) as collector:
        sock = connect(collector)
        steps = [
            {"type": "step", "step": i, "step_seconds": 0.2, "loss": 3.0 - i, "grad_norm": 0.5, "lr": 0.01}
            | {"samples": 64, "tokens": 8192}
            for i in range(3)
        ]
        send(
            sock,
            hello(0),
            *steps,
            {"type": "phase", "phase": "checkpoint", "event": "begin"},
            {"type": "phase", "phase": "checkpoint", "event": "end", "seconds": 4.0},
            {"type": "checkpoint", "step": 2, "path": "/ckpt/2"},
            {"type": "phase", "phase": "eval", "event": "begin"},
        )
        wait_until(lambda: received(collector) == 8, what="8 records")
        store = collect_into(collector)
        registry = make_registry(store)
        get = registry.get_sample_value
        labels = {"job": "toy", "rank": "0"}
        assert get("trainwarden_train_step", labels) == 2
        assert get("trainwarden_train_loss", labels) == 1.0
        assert get("trainwarden_train_grad_norm", labels) == 0.5
        assert get("trainwarden_train_learning_rate", labels) == 0.01
        assert get("trainwarden_train_samples_per_second", labels) == pytest.approx(320.0)
        assert get("trainwarden_train_tokens_per_second", labels) == pytest.approx(40960.0)
        assert get("trainwarden_train_step_duration_seconds_bucket", {**labels, "le": "0.1"}) == 0
        assert get("trainwarden_train_step_duration_seconds_bucket", {**labels, "le": "0.25"}) == 3
        assert get("trainwarden_train_step_duration_seconds_count", labels) == 3
        assert get("trainwarden_train_phase", {**labels, "phase": "eval"}) == 1
        assert get("trainwarden_train_phase", {**labels, "phase": "step"}) == 0
        assert get("trainwarden_train_phase_seconds", {**labels, "phase": "checkpoint"}) == 4.0
        assert get("trainwarden_train_last_checkpoint_step", labels) == 2
        assert get("trainwarden_train_pid", labels) == os.getpid()
        assert get("trainwarden_train_process_up", labels) == 1
        assert get("trainwarden_train_collective_in_flight_seconds", labels) == 0
        assert get("trainwarden_client_records_received_total") == 8
        assert get("trainwarden_client_records_rejected_total", {"reason": "malformed"}) == 0
        assert get("trainwarden_train_last_step_timestamp_seconds", labels) == pytest.approx(
            time.time(), abs=60
        )
        assert b"trainwarden_train_step_seconds" in generate_latest(registry)
        sock.close()


def test_windows_hold_one_point_per_record_not_per_collection(tmp_path: Path) -> None:
    """Step times sent between collections all reach the window once, and re-collecting adds none."""
    with running_collector(tmp_path) as collector:
        sock = connect(collector)
        send(sock, hello(0), *({"type": "step", "step": i, "step_seconds": 0.1 * (i + 1)} for i in range(5)))
        wait_until(lambda: received(collector) == 6)
        store = collect_into(collector)
        collect_into(collector, store)
        send(sock, {"type": "step", "step": 5, "step_seconds": 0.6, "loss": "NaN"})
        wait_until(lambda: received(collector) == 7)
        collect_into(collector, store)
        collect_into(collector, store)
        window = store.window("trainwarden_train_step_seconds", RANK0)
        assert [round(p.value, 3) for p in window] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
        assert [p.value for p in store.window("trainwarden_train_step", RANK0)] == [0, 1, 2, 3, 4, 5]
        loss = store.window("trainwarden_train_loss", RANK0)
        assert len(loss) == 1
        assert math.isnan(loss[0].value)
        sock.close()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (struct.pack(">I", 3) + b"\xff\xfe\xfd", Reason.BAD_UTF8),
        (struct.pack(">I", 5) + b"{nope", Reason.MALFORMED),
        (encode({"type": "shell", "cmd": "id"}), Reason.UNKNOWN_TYPE),
        (encode({"type": "step", "step": "seven"}), Reason.BAD_FIELD),
        (encode({"type": "step", "step": 1, "step_seconds": 1e300}), Reason.BAD_FIELD),
        (encode(hello(0)), Reason.DUPLICATE_HELLO),
    ],
)
def test_bad_records_are_counted_and_the_connection_survives(tmp_path: Path, raw: bytes, reason: str) -> None:
    """A bad record is rejected with its reason while good records on the same connection still count."""
    with running_collector(tmp_path) as collector:
        sock = connect(collector)
        send(sock, hello(0))
        sock.sendall(raw)
        send(sock, {"type": "step", "step": 1})
        wait_until(lambda: received(collector) == 2, what="hello and step")
        assert rejected(collector, reason) == 1
        assert sum(collector.status()["rejected"].values()) == 1
        sock.close()


def test_records_before_hello_are_rejected(tmp_path: Path) -> None:
    """A client that skips the hello has its records counted as no_hello and not applied."""
    with running_collector(tmp_path) as collector:
        sock = connect(collector)
        send(sock, {"type": "step", "step": 1}, {"type": "bye"})
        wait_until(lambda: rejected(collector, Reason.NO_HELLO) == 2)
        assert received(collector) == 0
        sock.close()


def test_oversized_frame_closes_the_connection_and_daemon_keeps_serving(tmp_path: Path) -> None:
    """An oversized frame is counted and its connection closed; a new client is served normally."""
    with running_collector(tmp_path) as collector:
        bad = connect(collector)
        send(bad, hello(0))
        bad.sendall(struct.pack(">I", 10 * 1024 * 1024) + b"x" * 1000)
        wait_until(lambda: rejected(collector, Reason.OVERSIZED) == 1)
        assert bad.recv(10) == b""  # closed by the daemon
        good = connect(collector)
        send(good, hello(1), {"type": "step", "step": 5})
        wait_until(lambda: received(collector) == 3)
        good.close()


def test_hostile_byte_soup_never_stops_the_server(tmp_path: Path) -> None:
    """Random bytes from many connections are rejected or closed, and the server still answers."""
    rng = __import__("random").Random(7)
    with running_collector(tmp_path) as collector:
        for _ in range(30):
            sock = connect(collector)
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 50)))
            sock.sendall(blob + struct.pack(">I", len(body)) + body)
            sock.close()
        good = connect(collector)
        send(good, hello(3), {"type": "step", "step": 1})
        wait_until(lambda: collector.status()["ranks"] and received(collector) >= 2)
        assert collector._thread is not None
        assert collector._thread.is_alive()
        good.close()


def test_uid_not_allowed_is_refused(tmp_path: Path) -> None:
    """With allowed_uids excluding ours, SO_PEERCRED makes the daemon refuse and count the connection."""
    with running_collector(tmp_path, allowed_uids=(os.getuid() + 4242,)) as collector:
        sock = connect(collector)
        with contextlib.suppress(OSError):  # the daemon may already have closed it
            send(sock, hello(0), {"type": "step", "step": 1})
        wait_until(lambda: rejected(collector, Reason.UID_DENIED) == 1)
        assert received(collector) == 0
        sock.close()


SYSTEM_PYTHON = Path("/usr/bin/python3")  # the venv's interpreter is not readable by `nobody`


@pytest.mark.skipif(os.getuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root and /usr/bin/python3")
def test_other_users_are_refused_by_default(tmp_path: Path) -> None:
    """A process running as `nobody` is refused by the default allow-list (daemon uid and root)."""
    runtime = Path(tempfile.mkdtemp(prefix="tw-uid-", dir="/tmp"))  # pytest's tmp is root-only
    runtime.chmod(0o755)
    try:
        with running_collector(runtime, socket_mode=0o666) as collector:
            code = (
                "import socket,struct,sys,json;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
                "print('connected',flush=True);b=json.dumps({'type':'bye'}).encode()\n"
                "try: s.sendall(struct.pack('>I',len(b))+b); s.recv(1)\nexcept OSError: pass"
            )
            child = subprocess.run(
                [str(SYSTEM_PYTHON), "-c", code, str(collector.socket_path)],
                check=True,
                user=65534,
                timeout=30,
                capture_output=True,
                text=True,
            )
            assert child.stdout.strip() == "connected"
            wait_until(lambda: rejected(collector, Reason.UID_DENIED) == 1)
            assert received(collector) == 0
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_rank_flood_is_capped(tmp_path: Path) -> None:
    """Hellos beyond max_ranks are rejected as rank_limit and their connections closed."""
    with running_collector(tmp_path, max_ranks=3) as collector:
        socks = []
        for rank in range(6):
            sock = connect(collector)
            send(sock, hello(rank))
            socks.append(sock)
        wait_until(lambda: rejected(collector, Reason.RANK_LIMIT) == 3)
        assert len(collector.status()["ranks"]) == 3
        for sock in socks:
            sock.close()


def test_connection_limit(tmp_path: Path) -> None:
    """Connections beyond max_connections are refused and counted."""
    with running_collector(tmp_path, max_connections=2) as collector:
        socks = [connect(collector) for _ in range(4)]
        wait_until(lambda: rejected(collector, Reason.CONNECTION_LIMIT) == 2)
        for sock in socks:
            sock.close()


def test_process_up_turns_zero_when_the_rank_exits(tmp_path: Path) -> None:
    """A rank whose process vanished reads process_up 0; its pid is taken from SO_PEERCRED."""
    with running_collector(tmp_path) as collector:
        code = (
            "import socket,struct,sys,json,os;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "h={'type':'hello','v':1,'job':'toy','rank':0,'local_rank':0,'world_size':1,'pid':1,"
            "'restart_count':0};b=json.dumps(h).encode();s.sendall(struct.pack('>I',len(b))+b);s.close()"
        )
        child = subprocess.run(
            [sys.executable, "-c", code, str(collector.socket_path)], check=True, timeout=30
        )
        assert child.returncode == 0
        wait_until(lambda: received(collector) == 1)
        store = collect_into(collector)
        pid = store.value("trainwarden_train_pid", job="toy", rank="0")
        assert pid is not None
        assert pid not in (1, os.getpid())  # the peer's real pid, not the one claimed in the hello
        assert store.value("trainwarden_train_process_up", job="toy", rank="0") == 0
        assert collector.context.pid_owners.get(int(pid)) is not None


def test_silent_jobs_are_forgotten_after_the_retention(tmp_path: Path) -> None:
    """A job silent longer than retention_seconds loses its series and pid ownership."""
    clock = FakeClock()
    with running_collector(tmp_path, clock=clock, retention_seconds=60) as collector:
        sock = connect(collector)
        send(sock, hello(0), {"type": "step", "step": 1})
        wait_until(lambda: received(collector) == 2)
        assert collect_into(collector).value("trainwarden_train_step", job="toy", rank="0") == 1
        clock.now += 61
        store = collect_into(collector)
        assert store.find("trainwarden_train_step") == []
        assert collector.context.pid_owners.get(os.getpid()) is None
        sock.close()


def test_collective_in_flight_ages_until_it_ends(tmp_path: Path) -> None:
    """A collective begun and not ended shows its age; the end clears it and feeds the histogram."""
    clock = FakeClock()
    with running_collector(tmp_path, clock=clock) as collector:
        sock = connect(collector)
        send(
            sock, hello(0), {"type": "collective", "op": "all_reduce", "event": "begin", "seq": 1, "bytes": 8}
        )
        wait_until(lambda: received(collector) == 2)
        clock.now += 42
        store = collect_into(collector)
        age = store.value("trainwarden_train_collective_in_flight_seconds", job="toy", rank="0")
        assert age == pytest.approx(42, abs=0.01)
        send(sock, {"type": "collective", "op": "all_reduce", "event": "end", "seq": 1, "seconds": 0.003})
        wait_until(lambda: received(collector) == 3)
        registry = make_registry(collect_into(collector))
        assert registry.get_sample_value("trainwarden_train_collective_in_flight_seconds", dict(RANK0)) == 0
        bucket = {"job": "toy", "op": "all_reduce", "le": "0.005"}
        assert registry.get_sample_value("trainwarden_train_collective_duration_seconds_bucket", bucket) == 1
        sock.close()


def test_restarted_rank_keeps_its_dropped_counter_monotonic(tmp_path: Path) -> None:
    """Drops reported by an old process of a rank are kept when a new process (new pid) says hello."""
    with running_collector(tmp_path) as collector:
        old = connect(collector)
        send(old, hello(0), {"type": "step", "step": 1, "dropped": 5})
        wait_until(lambda: received(collector) == 2)
        old.close()
        child_code = (
            "import socket,struct,sys,json,os;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "h={'type':'hello','v':1,'job':'toy','rank':0,'local_rank':0,'world_size':8,'pid':os.getpid(),"
            "'restart_count':1};st={'type':'step','step':2,'dropped':2};"
            "f=lambda r:(lambda b:struct.pack('>I',len(b))+b)(json.dumps(r).encode());"
            "s.sendall(f(h)+f(st))"
        )
        subprocess.run([sys.executable, "-c", child_code, str(collector.socket_path)], check=True, timeout=30)
        wait_until(lambda: received(collector) == 4)
        store = collect_into(collector)
        assert store.value("trainwarden_client_records_dropped_total", job="toy", rank="0") == 7
        assert store.value("trainwarden_train_launcher_restarts", job="toy", rank="0") == 1


def test_control_files_round_trip_and_reject_bad_job_names(tmp_path: Path) -> None:
    """write_control writes under <runtime_dir>/control atomically; a job name with '/' is refused."""
    with running_collector(tmp_path) as collector:
        state = ControlState(clip=ClipSettings(z_threshold=2.0), checkpoint_request="req-1")
        path = collector.write_control("toy", state)
        assert path == tmp_path / "control" / "toy.control.json"
        back = collector.read_control("toy")
        assert back is not None
        assert back.job == "toy"
        assert back.clip == ClipSettings(z_threshold=2.0)
        assert back.checkpoint_request == "req-1"
        assert collector.read_control("other") is None
        with pytest.raises(ControlFileError):
            collector.write_control("../escape", state)


def test_socket_is_created_with_the_configured_mode(tmp_path: Path) -> None:
    """The listening socket gets mode 0660 by default, so only the daemon's group may connect."""
    with running_collector(tmp_path) as collector:
        mode = collector.socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
    assert not collector.socket_path.exists()


def test_stale_socket_is_replaced_but_live_socket_and_files_are_not(tmp_path: Path) -> None:
    """A dead daemon's socket is replaced; a live listener or a regular file at the path is refused."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "client.sock"))
    stale.close()  # leaves the file behind, nobody listening
    with running_collector(tmp_path) as collector:
        with pytest.raises(CollectorError, match="another process"), running_collector(tmp_path):
            pass
        assert collector.socket_path.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "client.sock").write_text("not a socket")
    with pytest.raises(CollectorError, match="not a socket"), running_collector(other):
        pass
    assert (other / "client.sock").read_text() == "not a socket"


def test_openmetrics_exposition_of_the_histograms_is_valid(tmp_path: Path) -> None:
    """Two ranks' step histograms render as valid OpenMetrics (grouped per rank, buckets by numeric le)."""
    with running_collector(tmp_path) as collector:
        socks = []
        for rank, seconds in ((0, 0.05), (1, 7.0)):
            sock = connect(collector)
            send(sock, hello(rank), {"type": "step", "step": 1, "step_seconds": seconds})
            socks.append(sock)
        wait_until(lambda: received(collector) == 4)
        text = openmetrics_latest(make_registry(collect_into(collector))).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        hist = families["trainwarden_train_step_duration_seconds"]
        rank1 = [s for s in hist.samples if s.name.endswith("_bucket") and s.labels["rank"] == "1"]
        assert [s.labels["le"] for s in rank1][-3:] == ["120.0", "600.0", "+Inf"]
        assert [s.value for s in rank1 if s.labels["le"] in ("5.0", "10.0")] == [0, 1]
        for sock in socks:
            sock.close()
