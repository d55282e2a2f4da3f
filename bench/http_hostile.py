"""The daemon's HTTP server under slow, idle and bursting clients, scraped all the while.

Starts the real `trainwarden daemon` (this working tree, and with `--ref` also the code of a git
ref, one after the other, so both are measured in the same run) on loopback and then:

1. baseline: the same scraper as in 3., for `--baseline-seconds` with nothing else going on;
2. holds `--idle` connections that send nothing, `--slow-header` that send a request head one
   byte per second and never finish it, and `--slow-body` that send a POST head and then its
   body one byte per second, all at once;
3. while they are held, a separate scraper process scrapes /metrics every `--scrape-interval`
   seconds for `--hold` seconds (over one kept-alive connection as Prometheus does, or with
   `--scrapes fresh` a new connection each time), and after 2 s `--burst` clients connect at
   once and each asks for /healthz;
4. samples the daemon's thread count and RSS from /proc every 0.25 s, counts how many of the
   held connections the server cut off, reads "Traceback" lines from the daemon's log, and
   checks that `trainwarden_http_requests_total` adds up to the answers the clients received.

Fair under load (`--control`): a second daemon of the same code and config runs beside the
attacked one, attacked by nobody, and a second scraper scrapes it in the same seconds. Both
share whatever else the machine is doing, so "scrape p99 / control's p99" compares the server
with itself, not with a quieter minute; the scrapes in flight while the burst was are reported
on their own too. The 1-minute load average is printed next to each number.

    .venv/bin/python bench/http_hostile.py --ref 97978ca --control  # before (97978ca) and after
    .venv/bin/python bench/http_hostile.py --hold 30 --control --variant lane_connections=0
    .venv/bin/python bench/http_hostile.py --hold 30 --profile /tmp/http.txt   # py-spy stacks
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_ACCEPT = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
SCRAPE_HEADERS = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def scrape(host: str, port: int, timeout: float) -> tuple[float, int]:
    """One scrape on a fresh connection: (seconds, status); status 0 when it failed."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/metrics", headers=SCRAPE_HEADERS)
        response = conn.getresponse()
        response.read()
        status = response.status
    except OSError:
        status = 0
    finally:
        conn.close()
    return time.perf_counter() - start, status


def scraper_main(port: int, seconds: float, interval: float, mode: str) -> None:
    """The scraper process: scrape every `interval` s for `seconds` s, print JSON results.

    `keep-alive` reuses one connection as Prometheus does (a new one after a failure);
    `fresh` opens a connection per scrape.
    """
    results: list[tuple[float, float, int]] = []  # (wall-clock start, seconds, status)
    end = time.monotonic() + seconds
    conn: http.client.HTTPConnection | None = None
    while time.monotonic() < end:
        started = time.monotonic()
        at = time.time()
        if mode == "fresh":
            results.append((at, *scrape("127.0.0.1", port, 10.0)))
        else:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
            t0 = time.perf_counter()
            try:
                conn.request(
                    "GET", "/metrics", headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
                )
                response = conn.getresponse()
                response.read()
                results.append((at, time.perf_counter() - t0, response.status))
            except (OSError, http.client.HTTPException):
                results.append((at, time.perf_counter() - t0, 0))
                conn.close()
                conn = None
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    json.dump(results, sys.stdout)


def run_scraper(port: int, seconds: float, args: argparse.Namespace) -> list[tuple[float, int]]:
    """Scrape from a separate process (so the bench's own clients do not slow the scraper)."""
    cmd = [
        sys.executable,
        __file__,
        "--scraper",
        str(port),
        str(seconds),
        str(args.scrape_interval),
        args.scrapes,
    ]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    return [(float(t), int(s)) for _, t, s in json.loads(out)]


@dataclass
class Daemon:
    name: str
    pythonpath: Path
    work: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    answers: int = 0  # answers the bench received (every one should be counted by the daemon)
    config_text: str = ""

    @property
    def log(self) -> Path:
        return self.work / "daemon.log"

    def start(self) -> None:
        config = self.work / "config.toml"
        config.write_text(self.config_text)
        cmd = [
            sys.executable, "-m", "trainwarden.daemon.cli", "daemon", "--config", str(config),
            "--listen", f"127.0.0.1:{self.port}", "--runtime-dir", str(self.work / "run"),
            "--state-dir", str(self.work / "state"),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(self.pythonpath)}
        env.pop("NOTIFY_SOCKET", None)
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, status = scrape("127.0.0.1", self.port, 2.0)
            if status:
                self.answers += 1
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} never answered: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        text = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_field(self, key: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def counted(self) -> dict[str, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
        self.answers += 1
        counts: dict[str, float] = {}
        for line in body.splitlines():
            if line.startswith("trainwarden_http_requests_total{"):
                labels, value = line.rsplit(" ", 1)
                counts[labels[len("trainwarden_http_requests_total") :]] = float(value)
        return counts


@dataclass
class Held:
    kind: str
    closed_after: float | None = None
    answered: bool = False


async def hold_one(port: int, kind: str, held: Held, stop: asyncio.Event, opened: list[float]) -> None:
    """One hostile client: connect, then idle or dribble bytes until the server closes or `stop`."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
    except (OSError, TimeoutError):
        held.closed_after = 0.0
        return
    opened.append(time.monotonic() - start)
    if kind == "slow-header":
        pending = b"GET /metrics HTTP/1.1\r\nHost: bench\r\n" + b"X-Slow: " + b"a" * 100_000
    elif kind == "slow-body":
        pending = b"GET /metrics HTTP/1.1\r\nHost: bench\r\nContent-Length: 100000\r\n\r\n" + b"a" * 100_000
    else:
        pending = b""
    if kind == "slow-body":  # the head at once, then the body byte by byte
        head_end = pending.index(b"\r\n\r\n") + 4
        writer.write(pending[:head_end])
        pending = pending[head_end:]
    connected = time.monotonic()
    read = asyncio.ensure_future(reader.read(65536))
    try:
        while not stop.is_set():
            if pending:
                writer.write(pending[:1])
                pending = pending[1:]
            done, _ = await asyncio.wait({read}, timeout=1.0)
            if done:
                data = read.result() if not read.exception() else b""
                if data.startswith(b"HTTP/1."):
                    held.answered = True
                if not data:
                    held.closed_after = time.monotonic() - connected
                    return
                read = asyncio.ensure_future(reader.read(65536))
    except OSError:
        held.closed_after = time.monotonic() - connected
    finally:
        read.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def burst_one(port: int) -> tuple[float, int]:
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 60)
        writer.close()
    except (OSError, TimeoutError):
        return time.monotonic() - start, 0
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else 0
    return time.monotonic() - start, status


async def start_scraper(port: int, args: argparse.Namespace) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--scraper", str(port), str(args.hold), str(args.scrape_interval),
        args.scrapes,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


def scrape_stats(prefix: str, scrapes: list[tuple[float, float, int]]) -> dict[str, Any]:
    """p50 / p99 / max of the answered scrapes, how many were answered 200 of how many."""
    answered = [t for _, t, s in scrapes if s]
    return {
        f"{prefix}_ok": sum(1 for *_, s in scrapes if s == 200),
        f"{prefix}_n": len(scrapes),
        f"{prefix}_p50_s": percentile(answered, 0.5),
        f"{prefix}_p99_s": percentile(answered, 0.99),
        f"{prefix}_max_s": max(answered, default=float("nan")),
    }


def in_window(scrapes: list[tuple[float, float, int]], start: float, end: float) -> list[Any]:
    """The scrapes that were in flight at some moment of [start, end] (wall clock)."""
    return [x for x in scrapes if x[0] <= end and x[0] + x[1] >= start]


async def hostile(daemon: Daemon, control: Daemon | None, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    kinds = ["idle"] * args.idle + ["slow-header"] * args.slow_header + ["slow-body"] * args.slow_body
    held = [Held(kind) for kind in kinds]
    opened: list[float] = []
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(hold_one(daemon.port, h.kind, h, stop, opened)) for h in held]
    while len(opened) + sum(h.closed_after == 0.0 for h in held) < len(held):
        await asyncio.sleep(0.05)
        if time.monotonic() - t0 > 120:
            break
    establish = time.monotonic() - t0

    threads: list[int] = []
    rss: list[int] = []
    sampling = True

    def sample() -> None:
        while sampling:
            threads.append(daemon.status_field("Threads"))
            rss.append(daemon.status_field("VmRSS"))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_start = daemon.cpu_seconds()
    profiler = None
    if args.profile:
        assert daemon.proc is not None
        profiler = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(daemon.proc.pid),
            "--format", "raw", "--rate", "250",
            "--duration", str(int(args.hold)), "--nonblocking", "--output", args.profile,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    scraper = await start_scraper(daemon.port, args)
    control_scraper = await start_scraper(control.port, args) if control is not None else None
    await asyncio.sleep(2.0)
    burst_start = time.monotonic()
    burst_wall = time.time()
    burst = await asyncio.gather(*(burst_one(daemon.port) for _ in range(args.burst)))
    burst_seconds = time.monotonic() - burst_start
    out, _ = await scraper.communicate()
    scrapes: list[tuple[float, float, int]] = [tuple(x) for x in json.loads(out)]
    controls: list[tuple[float, float, int]] = []
    if control_scraper is not None:
        control_out, _ = await control_scraper.communicate()
        controls = [tuple(x) for x in json.loads(control_out)]
    if profiler is not None:
        await profiler.wait()
    stop.set()
    await asyncio.gather(*tasks)
    cpu_hostile = daemon.cpu_seconds() - cpu_start
    sampling = False
    sampler.join()
    daemon.answers += sum(1 for *_, s in scrapes if s) + sum(1 for _, s in burst if s)
    if control is not None:
        control.answers += sum(1 for *_, s in controls if s)
    window = (burst_wall, burst_wall + burst_seconds)
    daemon.answers += sum(h.answered for h in held)
    cut = [h.closed_after for h in held if h.closed_after]
    return {
        "establish_s": establish,
        "cpu_hostile_s": cpu_hostile,
        "open_p99_s": percentile(opened, 0.99),
        **scrape_stats("scrape", scrapes),
        **scrape_stats("burst_scrape", in_window(scrapes, *window)),
        **scrape_stats("control", controls),
        **scrape_stats("control_burst", in_window(controls, *window)),
        "burst_ok": sum(1 for _, s in burst if s == 200),
        "burst_p50_s": percentile([t for t, s in burst if s], 0.5),
        "burst_p99_s": percentile([t for t, s in burst if s], 0.99),
        "burst_max_s": max((t for t, s in burst if s), default=float("nan")),
        "burst_all_s": burst_seconds,
        "threads_max": max(threads),
        "rss_max_mib": max(rss) / 1024,
        "held_cut": len(cut),
        "held_cut_median_s": statistics.median(cut) if cut else float("nan"),
        "held_answered": sum(h.answered for h in held),
        "held_cut_by_kind": {k: sum(1 for h in held if h.kind == k and h.closed_after) for k in set(kinds)},
    }


def measure(name: str, pythonpath: Path, args: argparse.Namespace, config_text: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"tw-http-{name}-") as tmp:
        daemon = Daemon(name, pythonpath, Path(tmp) / "attacked", config_text=config_text)
        daemon.work.mkdir()
        control = None
        if args.control:  # the same code and config, scraped in the same seconds, attacked by nobody
            control = Daemon(f"{name}-control", pythonpath, Path(tmp) / "control", config_text=config_text)
            control.work.mkdir()
            control.start()
        daemon.start()
        try:
            time.sleep(2.0)
            baseline = run_scraper(daemon.port, args.baseline_seconds, args)
            daemon.answers += sum(1 for _, s in baseline if s)
            threads_idle = daemon.status_field("Threads")
            rss_idle = daemon.status_field("VmRSS") / 1024
            load_before = os.getloadavg()[0]
            result = asyncio.run(hostile(daemon, control, args))
            result["load"] = (load_before, os.getloadavg()[0])
            time.sleep(1.0)
            answers_before = daemon.answers
            counts = daemon.counted()
            result |= {
                "scrape_p99_ratio": result["scrape_p99_s"] / percentile([t for t, _ in baseline], 0.99),
                "baseline_p50_s": percentile([t for t, _ in baseline], 0.5),
                "baseline_p99_s": percentile([t for t, _ in baseline], 0.99),
                "threads_idle": threads_idle,
                "rss_idle_mib": rss_idle,
                "answers": answers_before,
                "counted": int(sum(counts.values())),
                "tracebacks": daemon.log.read_text(errors="replace").count("Traceback"),
                "alive": daemon.proc is not None and daemon.proc.poll() is None,
                "burst_scrape_p99_vs_control": result["burst_scrape_p99_s"] / result["control_burst_p99_s"],
                "scrape_p99_vs_control": result["scrape_p99_s"] / result["control_p99_s"],
            }
        finally:
            daemon.stop()
            if control is not None:
                control.stop()
        return result


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    ms = 1000.0
    rows: list[tuple[str, tuple[str, ...], str, float]] = [
        ("held connections established in", ("establish_s",), "{:.1f} s", 1.0),
        ("scrape p50 / p99, no load", ("baseline_p50_s", "baseline_p99_s"), "{:.1f} / {:.1f} ms", ms),
        ("scrape p50 / p99 / max, held + burst", ("scrape_p50_s", "scrape_p99_s", "scrape_max_s"),
         "{:.1f} / {:.1f} / {:.1f} ms", ms),
        ("scrape p99 held + burst / no load", ("scrape_p99_ratio",), "{:.1f}x", 1.0),
        ("scrapes answered 200", ("scrape_ok", "scrape_n"), "{} of {}", 1.0),
        ("scrape p50 / p99 / max, while the burst was in flight",
         ("burst_scrape_p50_s", "burst_scrape_p99_s", "burst_scrape_max_s"),
         "{:.1f} / {:.1f} / {:.1f} ms", ms),
        ("scrapes in flight during the burst, answered 200", ("burst_scrape_ok", "burst_scrape_n"),
         "{} of {}", 1.0),
        ("load average (1 min) before / after the phase", ("load",), "{0[0]:.1f} / {0[1]:.1f}", 1.0),
    ]  # fmt: skip
    if args.control:
        rows += [
            ("control daemon (no clients) scrape p50 / p99 / max, same seconds",
             ("control_p50_s", "control_p99_s", "control_max_s"), "{:.1f} / {:.1f} / {:.1f} ms", ms),
            ("control daemon scrape p99 while the burst was in flight", ("control_burst_p99_s",), "{:.1f} ms",
             ms),
            ("**scrape p99 / control's p99, whole phase**", ("scrape_p99_vs_control",), "{:.2f}x", 1.0),
            ("**scrape p99 / control's p99, during the burst**", ("burst_scrape_p99_vs_control",), "{:.2f}x",
             1.0),
        ]  # fmt: skip
    rows += [
        ("burst connect + answer p50 / p99 / max", ("burst_p50_s", "burst_p99_s", "burst_max_s"),
         "{:.0f} / {:.0f} / {:.0f} ms", ms),
        ("burst answered 200", ("burst_ok",), "{} of " + str(args.burst), 1.0),
        ("daemon CPU during the held + burst phase", ("cpu_hostile_s",), "{:.1f} s", 1.0),
        ("threads idle / max", ("threads_idle", "threads_max"), "{} / {}", 1.0),
        ("RSS idle / max", ("rss_idle_mib", "rss_max_mib"), "{:.1f} / {:.1f} MiB", 1.0),
        ("held connections cut off (median after)", ("held_cut", "held_cut_median_s"), "{} ({:.0f} s)", 1.0),
        ("answers received / counted", ("answers", "counted"), "{} / {}", 1.0),
        ("tracebacks in the log", ("tracebacks",), "{}", 1.0),
    ]  # fmt: skip
    lines = ["| measure | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for label, keys, fmt, scale in rows:
        cells = []
        for result in results.values():
            values = [result[k] * scale if k.endswith("_s") else result[k] for k in keys]
            cells.append(fmt.format(*values))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--scraper":
        scraper_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", help="also measure the server of this git ref (before/after)")
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--slow-header", type=int, default=250)
    parser.add_argument("--slow-body", type=int, default=50)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=60.0)
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--scrape-interval", type=float, default=0.05)
    parser.add_argument(
        "--scrapes", choices=["keep-alive", "fresh"], default="keep-alive",
        help="scrape over one kept-alive connection like Prometheus (default) or a new one each time",
    )  # fmt: skip
    parser.add_argument(
        "--control", action="store_true",
        help="also run an unattacked daemon of the same code, scraped in the same seconds: the fair"
        " baseline on a loaded machine (each ratio compares scrapes that shared the machine's load)",
    )  # fmt: skip
    parser.add_argument(
        "--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
        help="also measure the working tree with these [daemon.http] settings (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", help="py-spy raw (collapsed) stacks of the held + burst phase to this file"
    )
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tw-http-ref-") as tmp:
        if args.ref:
            git = ["git", "-C", str(REPO), "archive", args.ref, "src"]
            archive = subprocess.run(git, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            results[args.ref] = measure("ref", Path(tmp) / "src", args)
            print(json.dumps(results[args.ref], indent=1), file=sys.stderr)
        results["working tree"] = measure("tree", REPO / "src", args)
        print(json.dumps(results["working tree"], indent=1), file=sys.stderr)
        for variant in args.variant:
            settings = "\n".join(item.strip() for item in variant.split(","))
            results[f"tree, {variant}"] = measure(
                "variant", REPO / "src", args, f"[daemon.http]\n{settings}\n"
            )
            print(json.dumps(results[f"tree, {variant}"], indent=1), file=sys.stderr)
    print(report(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
