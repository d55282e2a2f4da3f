"""Helpers for the training client/collector tests: a real collector, raw clients, a daemon process.

Run as a script (`python tests/training_support.py RUNTIME_DIR STATUS_FILE`) it is a minimal
daemon: the real TrainingCollector, its state dumped as JSON every 20 ms, so tests can kill and
restart it like the real daemon.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support import wait_until
from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.training import TrainingCollector, TrainingOptions
from trainwarden.protocol import encode
from trainwarden.store import Store

HERE = Path(__file__).resolve()


def hello(rank: int = 0, job: str = "toy", world_size: int = 8, pid: int | None = None) -> dict[str, Any]:
    return {
        "type": "hello",
        "v": 1,
        "job": job,
        "rank": rank,
        "local_rank": rank,
        "world_size": world_size,
        "pid": pid or os.getpid(),
        "restart_count": 0,
    }


@contextmanager
def running_collector(
    runtime_dir: Path,
    clock: Callable[[], float] = time.time,
    **options: Any,
) -> Iterator[TrainingCollector]:
    """A started TrainingCollector under `runtime_dir`, closed afterwards."""
    context = CollectorContext(runtime_dir=runtime_dir, state_dir=runtime_dir, clock=clock)
    collector = TrainingCollector(TrainingOptions(**options), context)
    collector.start()
    try:
        yield collector
    finally:
        collector.close()


def connect(collector: TrainingCollector) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(str(collector.socket_path))
    return sock


def send(sock: socket.socket, *records: dict[str, Any]) -> None:
    sock.sendall(b"".join(encode(r) for r in records))


def received(collector: TrainingCollector) -> int:
    return int(collector.status()["received"])


def rejected(collector: TrainingCollector, reason: str) -> int:
    return int(collector.status()["rejected"].get(reason, 0))


def collect_into(collector: TrainingCollector, store: Store | None = None) -> Store:
    store = store or Store()
    store.replace("training", collector.collect(), time.time())
    return store


# --- the daemon process --------------------------------------------------------------------------


def start_daemon_process(runtime_dir: Path, status_file: Path) -> subprocess.Popen[bytes]:
    """The collector in its own process (so a test can SIGKILL it); waits until it listens."""
    status_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(HERE), str(runtime_dir), str(status_file)])
    wait_until(status_file.exists, what="daemon process to start")
    return proc


def read_status(status_file: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(status_file.read_text()))
    except (OSError, ValueError):
        return {}


def _serve(runtime_dir: Path, status_file: Path) -> None:
    with running_collector(runtime_dir) as collector:
        tmp = status_file.with_suffix(".tmp")
        while True:
            store = collect_into(collector)
            steps = {
                f"{s.labels[0][1]}/{s.labels[1][1]}": s.value for s in store.find("trainwarden_train_step")
            }
            dropped = {
                f"{s.labels[0][1]}/{s.labels[1][1]}": s.value
                for s in store.find("trainwarden_client_records_dropped_total")
            }
            status = {"received": received(collector), "steps": steps, "dropped": dropped}
            tmp.write_text(json.dumps(status))
            tmp.replace(status_file)
            time.sleep(0.02)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))
