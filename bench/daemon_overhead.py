"""Overhead of the trainwarden daemon next to Debian's prometheus-node-exporter on this machine.

Both run on loopback against the real /proc and /sys and are scraped the same number of times
with the headers Prometheus sends (OpenMetrics preferred, gzip). CPU time comes from
/proc/<pid>/stat (utime + stime), memory from /proc/<pid>/status. Reported:

- CPU seconds per scrape and per series per scrape (the scrape phase divided by the scrape count;
  for trainwarden this includes the background collection that ran meanwhile),
- RSS after the scrapes (and the peak, VmHWM),
- CPU per minute when idle (no scrapes; trainwarden's collectors still run at their default 5 s),
- CPU per minute at a 15 s scrape interval (idle + 4 scrapes), the cost a node actually pays,
- scrape latency p50/p99,
- a second trainwarden with every collector at 1 s: idle CPU as % of one core (target <= 0.5 %),

each as a ratio to node_exporter where one exists.

    .venv/bin/python bench/daemon_overhead.py                      # 500 scrapes, 60 s idle windows
    .venv/bin/python bench/daemon_overhead.py --scrapes 200 --idle-seconds 30 --markdown
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
TRAINWARDEN = Path(sys.executable).parent / "trainwarden"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            values[key] = int(rest.split()[0])
    return values


@dataclass
class Target:
    name: str
    cmd: list[str]
    port: int
    ready_path: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path = Path("/dev/null")
    started: float = 0.0
    ready_after: float = 0.0
    results: dict[str, float] = field(default_factory=dict)

    def start(self, log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        with log.open("wb") as sink:
            self.proc = subprocess.Popen(self.cmd, stdout=sink, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", self.ready_path)
                if conn.getresponse().status == 200:
                    self.ready_after = time.monotonic() - self.started
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"{self.name} not ready after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape_once(conn: http.client.HTTPConnection) -> tuple[float, bytes]:
    begin = time.perf_counter()
    conn.request("GET", "/metrics", headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - begin
    if response.status != 200:
        raise SystemExit(f"scrape answered {response.status}")
    if response.getheader("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return elapsed, body


def count_series(body: bytes) -> int:
    return sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))


def scrape_phase(target: Target, scrapes: int, warmup: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=30)
    for _ in range(warmup):
        scrape_once(conn)
    latencies = []
    before = cpu_seconds(target.pid)
    body = b""
    for _ in range(scrapes):
        elapsed, body = scrape_once(conn)
        latencies.append(elapsed)
    used = cpu_seconds(target.pid) - before
    conn.close()
    series = count_series(body)
    latencies.sort()
    mem = memory_kib(target.pid)
    target.results.update(
        {
            "series": series,
            "cpu_per_scrape_s": used / scrapes,
            "cpu_per_series_per_scrape_s": used / scrapes / series,
            "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "rss_bytes": mem["VmRSS"] * 1024,
            "peak_rss_bytes": mem["VmHWM"] * 1024,
            "ready_after_s": target.ready_after,
        }
    )


def idle_phase(targets: list[Target], seconds: float) -> None:
    """Measure every target's CPU over the same idle window (no scrapes)."""
    before = {t.name: cpu_seconds(t.pid) for t in targets}
    time.sleep(seconds)
    for t in targets:
        used = cpu_seconds(t.pid) - before[t.name]
        t.results["idle_cpu_per_minute_s"] = used * 60 / seconds
        t.results["idle_core_percent"] = used / seconds * 100


def one_second_config(directory: Path) -> Path:
    from trainwarden.plugins import plugin_groups  # noqa: PLC0415 - only the bench needs it

    lines = []
    for name, options_cls in plugin_groups()["collectors"].items():
        if options_cls().enabled:  # what runs by default, now every second
            lines += [f"[collectors.{name}]", "interval_seconds = 1.0", ""]
    path = directory / "one_second.toml"
    path.write_text("\n".join(lines))
    return path


def trainwarden_cmd(port: int, work: Path, name: str, config: Path | None = None) -> list[str]:
    cmd = [str(TRAINWARDEN), "daemon", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--runtime-dir", str(work / name / "run"), "--state-dir", str(work / name / "state")]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(tw: Target, ne: Target, tw1: Target, args: argparse.Namespace) -> str:
    t, n = tw.results, ne.results
    for r in (t, n):
        r["cpu_per_minute_at_15s_scrapes_s"] = r["idle_cpu_per_minute_s"] + 4 * r["cpu_per_scrape_s"]
    rows = [
        ("series per scrape", f"{t['series']:.0f}", f"{n['series']:.0f}", ratio(t["series"], n["series"])),
        (
            "CPU per scrape",
            f"{t['cpu_per_scrape_s'] * 1e3:.2f} ms",
            f"{n['cpu_per_scrape_s'] * 1e3:.2f} ms",
            ratio(t["cpu_per_scrape_s"], n["cpu_per_scrape_s"]),
        ),
        (
            "CPU per series per scrape",
            f"{t['cpu_per_series_per_scrape_s'] * 1e6:.2f} µs",
            f"{n['cpu_per_series_per_scrape_s'] * 1e6:.2f} µs",
            ratio(t["cpu_per_series_per_scrape_s"], n["cpu_per_series_per_scrape_s"]),
        ),
        (
            "RSS after scrapes (peak)",
            f"{t['rss_bytes'] / 2**20:.1f} MiB ({t['peak_rss_bytes'] / 2**20:.1f})",
            f"{n['rss_bytes'] / 2**20:.1f} MiB ({n['peak_rss_bytes'] / 2**20:.1f})",
            ratio(t["rss_bytes"], n["rss_bytes"]),
        ),
        (
            "idle CPU per minute",
            f"{t['idle_cpu_per_minute_s'] * 1e3:.1f} ms",
            f"{n['idle_cpu_per_minute_s'] * 1e3:.1f} ms",
            ratio(t["idle_cpu_per_minute_s"], n["idle_cpu_per_minute_s"]),
        ),
        (
            "CPU per minute, scraped every 15 s",
            f"{t['cpu_per_minute_at_15s_scrapes_s'] * 1e3:.1f} ms",
            f"{n['cpu_per_minute_at_15s_scrapes_s'] * 1e3:.1f} ms",
            ratio(t["cpu_per_minute_at_15s_scrapes_s"], n["cpu_per_minute_at_15s_scrapes_s"]),
        ),
        (
            "scrape latency p50",
            f"{t['latency_p50_s'] * 1e3:.2f} ms",
            f"{n['latency_p50_s'] * 1e3:.2f} ms",
            ratio(t["latency_p50_s"], n["latency_p50_s"]),
        ),
        (
            "scrape latency p99",
            f"{t['latency_p99_s'] * 1e3:.2f} ms",
            f"{n['latency_p99_s'] * 1e3:.2f} ms",
            ratio(t["latency_p99_s"], n["latency_p99_s"]),
        ),
        ("start to ready", f"{t['ready_after_s']:.2f} s", f"{n['ready_after_s']:.2f} s", ""),
    ]
    out = [
        (
            f"{args.scrapes} scrapes each after {args.warmup} warm-up, idle windows of "
            f"{args.idle_seconds:g} s, {os.cpu_count()} CPUs"
        ),
        "",
        "| measure | trainwarden | node_exporter | ratio |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
        (
            f"Every collector at 1 s: idle CPU {tw1.results['idle_core_percent']:.3f} % of one core "
            f"({tw1.results['idle_cpu_per_minute_s'] * 1e3:.1f} ms per minute), "
            f"RSS {memory_kib(tw1.pid)['VmRSS'] / 1024:.1f} MiB."
        ),
    ]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--markdown", action="store_true", help="print only the markdown table")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    if not NODE_EXPORTER.exists():
        raise SystemExit(f"{NODE_EXPORTER} not found: apt-get install prometheus-node-exporter")
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as tmp:
        work = Path(tmp)
        ne_port, tw_port, tw1_port = free_port(), free_port(), free_port()
        ne = Target(
            "node_exporter",
            [str(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{ne_port}", "--log.level=warn"],
            ne_port,
            "/metrics",
        )
        tw = Target("trainwarden", trainwarden_cmd(tw_port, work, "tw"), tw_port, "/healthz")
        tw1 = Target(
            "trainwarden_1s",
            trainwarden_cmd(tw1_port, work, "tw1", one_second_config(work)),
            tw1_port,
            "/healthz",
        )
        targets = [ne, tw, tw1]
        try:
            for target in targets:
                target.start(work / f"{target.name}.log")
                target.wait_ready()
            # Let start-up work (imports, first collection) settle before measuring.
            time.sleep(3)
            idle_phase(targets, args.idle_seconds)
            for target in (ne, tw):
                scrape_phase(target, args.scrapes, args.warmup)
            text = report(tw, ne, tw1, args)
        finally:
            for target in targets:
                target.stop()
        if args.json:
            args.json.write_text(json.dumps({t.name: t.results for t in targets}, indent=2))
    print(text if args.markdown else f"trainwarden daemon overhead vs node_exporter\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
