"""Per-call cost of the training client's hot path, against a bare socket.send and logging.info.

Measures, in one run and on one machine:
  - bare `socket.send` of exactly the bytes of one encoded step record (blocking AF_UNIX stream
    to a running daemon), and `logging.info` of a similar line to a file: the two yardsticks;
  - `Reporter.step()` with the default sender thread and with `background=False`, each with the
    daemon up (the real TrainingCollector in its own process) and down (no socket);
  - `Reporter.poll_control()` with the default 0.1 s stat interval and with a stat on every call;
  - the amortised cost: wall time of N back-to-back `step()` calls plus the final flush, divided
    by N, which also charges the sender thread's encoding and sending to the loop.
The clipper's per-step cost is measured in bench/spikes.py (see the row marked there).

Usage: .venv/bin/python bench/client_overhead.py [--calls 20000] [--rounds 3] [--json out.json]
Times include one perf_counter_ns pair per call (shown as "timer" so it can be subtracted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from trainwarden.client import Reporter
from trainwarden.client.identity import identity_from_env
from trainwarden.control import ClipSettings, ControlState, control_path, write_control
from trainwarden.protocol import PROTOCOL_VERSION, encode

DAEMON = """
import sys, time
from pathlib import Path
from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.training import TrainingCollector, TrainingOptions
runtime = Path(sys.argv[1])
c = TrainingCollector(TrainingOptions(), CollectorContext(runtime_dir=runtime, state_dir=runtime))
c.start()
print("ready", flush=True)
while True:
    time.sleep(1.0)
    c.collect()  # as the scheduler would, so pending windows stay bounded
"""

BURST_CLIENT = """
import os, sys, time
from trainwarden.client import Reporter
sock, go, rank, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
env = {"RANK": str(rank), "WORLD_SIZE": "8"}
rep = Reporter(job="burst", socket_path=sock, control_dir="/nonexistent", env=env, max_queue=2 * n)
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(n):
    rep.step(i, loss=2.5, grad_norm=0.8, lr=3e-4, samples=256.0, tokens=524288.0)
rep.close(timeout=60)
print(rep.dropped)
"""

STEP = {"loss": 2.345678, "grad_norm": 0.812345, "lr": 3e-4, "samples": 256.0, "tokens": 524288.0}


def per_call(fn: Callable[[int], object], calls: int) -> list[int]:
    """Nanoseconds of each of `calls` invocations (after a warm-up of calls // 10)."""
    for i in range(calls // 10):
        fn(i)
    clock = time.perf_counter_ns
    out = [0] * calls
    for i in range(calls):
        t0 = clock()
        fn(i)
        out[i] = clock() - t0
    return out


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


class Result:
    def __init__(self, name: str) -> None:
        self.name = name
        self.p50: list[float] = []
        self.p99: list[float] = []

    def add(self, samples: list[int]) -> None:
        self.p50.append(pct(samples, 0.50))
        self.p99.append(pct(samples, 0.99))

    @property
    def median_p50(self) -> float:
        return statistics.median(self.p50)

    @property
    def median_p99(self) -> float:
        return statistics.median(self.p99)


def start_daemon(runtime: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, str(runtime)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("daemon did not start")
    return proc


def bare_send(sock_path: Path, frame: bytes, calls: int, rank: int) -> list[int]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(sock_path))
    ident = identity_from_env("bench", {"RANK": str(rank), "WORLD_SIZE": "64"})
    sock.sendall(encode(ident.hello(PROTOCOL_VERSION)))
    send = sock.send
    samples = per_call(lambda _i: send(frame), calls)
    sock.close()
    return samples


def reporter_steps(reporter: Reporter, calls: int) -> list[int]:
    step = reporter.step
    kw = STEP
    return per_call(lambda i: step(i, **kw), calls)


def amortised(reporter: Reporter, calls: int) -> tuple[float, float]:
    """µs per step including the sender's work (N steps + flush) / N: wall time, and CPU time of
    this process (both threads; the daemon's CPU is not in it, other load on the box barely is)."""
    step = reporter.step
    kw = STEP
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(calls):
        step(i, **kw)
    reporter.flush(timeout=60)
    return (time.perf_counter() - t0) / calls * 1e6, (time.process_time() - c0) / calls * 1e6


def daemon_ingest(n: int) -> tuple[float, int]:
    """8 processes send n steps each as fast as they can: records/s the daemon accepted, drops."""
    from trainwarden.collectors.base import CollectorContext  # noqa: PLC0415 - daemon side only here
    from trainwarden.collectors.training import TrainingCollector, TrainingOptions  # noqa: PLC0415

    runtime = Path(tempfile.mkdtemp(prefix="tw-ingest-"))
    collector = TrainingCollector(TrainingOptions(), CollectorContext(runtime_dir=runtime, state_dir=runtime))
    collector.start()
    go = runtime / "go"
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", BURST_CLIENT, str(collector.socket_path), str(go), str(rank), str(n)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for rank in range(8)
        ]
        time.sleep(3.0)  # let all eight import and connect before the start signal
        expected = 8 * (n + 2)
        go.touch()
        t0 = time.perf_counter()
        while collector.status()["received"] < expected and time.perf_counter() - t0 < 120:
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        drops = sum(int(p.communicate(timeout=60)[0]) for p in procs)
        return collector.status()["received"] / elapsed, drops
    finally:
        collector.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    calls, rounds = args.calls, args.rounds

    runtime = Path(tempfile.mkdtemp(prefix="tw-bench-"))
    down_runtime = Path(tempfile.mkdtemp(prefix="tw-bench-down-"))
    sock_path = runtime / "client.sock"
    frame = encode({"type": "step", "step": 123456, "step_seconds": 0.123456, "dropped": 0, **STEP})

    log_path = runtime / "bench.log"
    logger = logging.getLogger("bench")
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    ctl_dir = runtime / "control"
    write_control(control_path(ctl_dir, "bench"), ControlState(job="bench", clip=ClipSettings()))

    results: dict[str, Result] = {
        name: Result(name)
        for name in (
            "timer (empty call)",
            "bare socket.send (same bytes)",
            "logging.info to a file",
            "step(), sender thread, daemon up",
            "step(), sender thread, daemon down",
            "step(), background=False, daemon up",
            "step(), background=False, daemon down",
            "poll_control() (0.1 s stat interval)",
            "poll_control() (stat every call)",
        )
    }
    amort: dict[str, list[tuple[float, float]]] = {
        "sender thread, daemon up": [],
        "background=False, daemon up": [],
    }
    drops: dict[str, int] = {}
    daemon = start_daemon(runtime)
    try:
        for r in range(rounds):
            results["timer (empty call)"].add(per_call(lambda _i: None, calls))
            results["bare socket.send (same bytes)"].add(bare_send(sock_path, frame, calls, 60 + r))
            results["logging.info to a file"].add(
                per_call(
                    lambda i: logger.info("step %d loss %.6f grad_norm %.6f", i, 2.345678, 0.812345), calls
                )
            )
            for background in (True, False):
                mode = "sender thread" if background else "background=False"
                env = {"RANK": str(r * 2 + int(background)), "WORLD_SIZE": "64"}
                # A queue larger than the burst, so every measured call takes the enqueue path
                # (a full queue would make step() cheaper: it only counts the drop).
                big = {"max_queue": 4 * calls, "background": background}
                rep = Reporter(job="bench", socket_path=sock_path, control_dir=ctl_dir, env=env, **big)
                results[f"step(), {mode}, daemon up"].add(reporter_steps(rep, calls))
                rep.flush(timeout=60)
                amort[f"{mode}, daemon up"].append(amortised(rep, calls))
                drops[f"{mode}, daemon up"] = drops.get(f"{mode}, daemon up", 0) + rep.dropped
                rep.close(timeout=10)
                down = Reporter(
                    job="bench", socket_path=down_runtime / "client.sock", control_dir=ctl_dir, **big
                )
                results[f"step(), {mode}, daemon down"].add(reporter_steps(down, calls))
                down.close(timeout=0.1)
            for name, interval in (("0.1 s stat interval", 0.1), ("stat every call", 0.0)):
                poller = Reporter(
                    job="bench", socket_path=sock_path, control_dir=ctl_dir, control_interval=interval
                )
                results[f"poll_control() ({name})"].add(
                    per_call(lambda _i, p=poller: p.poll_control(), calls)
                )
                poller.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)

    send_p50 = results["bare socket.send (same bytes)"].median_p50
    log_p50 = results["logging.info to a file"].median_p50
    python = sys.version.split()[0]
    print(f"# client overhead: {calls} calls x {rounds} rounds, Python {python}, {os.cpu_count()} CPUs")
    print(f"# frame of one step record: {len(frame)} bytes\n")
    print("| call | p50 µs | p99 µs | p50 / bare send | p50 / logging.info |")
    print("|---|---:|---:|---:|---:|")
    for res in results.values():
        p50, p99 = res.median_p50, res.median_p99
        print(f"| {res.name} | {p50:.2f} | {p99:.2f} | {p50 / send_p50:.2f} | {p50 / log_p50:.2f} |")
    print("| clipper step: measured in bench/spikes.py (not here) | n/a | n/a | n/a | n/a |")
    print("\n| amortised per step, (N steps + flush) / N | wall µs | CPU µs of the training process |")
    print("|---|---:|---:|")
    for name, values in amort.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")
    print("\n| reporter drops with the daemon up (all rounds) | records |")
    print("|---|---:|")
    for name, n in drops.items():
        print(f"| {name} | {n} |")
    rate, burst_drops = daemon_ingest(5000)
    print("\n| daemon ingest, 8 processes x 5000 steps as fast as they can | value |")
    print("|---|---:|")
    print(f"| records accepted per second | {rate:,.0f} |")
    print(f"| records dropped (clients' counters) | {burst_drops} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "calls": calls,
                    "rounds": rounds,
                    "p50_us": {k: v.median_p50 for k, v in results.items()},
                    "p99_us": {k: v.median_p99 for k, v in results.items()},
                    "amortised_wall_cpu_us": amort,
                    "drops_daemon_up": drops,
                    "ingest_records_per_second": rate,
                    "ingest_drops": burst_drops,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
