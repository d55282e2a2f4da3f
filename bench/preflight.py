"""Preflight wall time and false-failure rate on a healthy node, every check but the collective.

Each run is the real command a Slurm prolog runs (`python -m trainwarden preflight`, a fresh
process) on this machine's /proc and /dev/kmsg, FakeNvml `h100-sxm-8gpu` (8 GPUs), the 4-port NDR
InfiniBand fixture tree (all ports made active), a checkpoint directory on this machine's disk with
the default 16 MiB fsynced write probe and floors, and a real `trainwarden daemon` on loopback for
the daemon check. The baseline, measured in the same run, is the same interpreter starting
trainwarden's command line and doing nothing (`python -m trainwarden --version`): the ratio
says what the checks add to the process start every prolog pays anyway.

Usage: .venv/bin/python bench/preflight.py [--runs 200] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IB_FIXTURE = ROOT / "tests" / "fixtures" / "infiniband" / "ndr_4port" / "sys"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"daemon at {url} never became ready")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    work = Path(
        tempfile.mkdtemp(
            prefix="tw-preflight-bench-", dir=ROOT / "build" if (ROOT / "build").is_dir() else None
        )
    )
    try:
        sysfs = work / "sys"
        shutil.copytree(IB_FIXTURE, sysfs)
        port_dir = sysfs / "class" / "infiniband" / "mlx5_3" / "ports" / "1"
        (port_dir / "state").write_text("4: ACTIVE\n")
        (port_dir / "phys_state").write_text("5: LinkUp\n")
        (port_dir / "rate").write_text("400 Gb/sec (4X NDR)\n")
        ckpt = work / "ckpt"
        ckpt.mkdir()
        env = {**os.environ, "TRAINWARDEN_NVML_FIXTURE": "h100-sxm-8gpu"}
        url = f"http://127.0.0.1:{free_port()}"
        daemon = subprocess.Popen(
            [PY, "-m", "trainwarden", "daemon", "--listen", url.removeprefix("http://"),
             "--runtime-dir", str(work / "run"), "--state-dir", str(work / "daemon-state")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_ready(url)
            preflight = [
                PY, "-m", "trainwarden", "preflight", "--json", f"--path.sysfs={sysfs}",
                f"--checkpoint-dir={ckpt}", f"--state-dir={work / 'state'}", f"--daemon-url={url}",
                "--min-free-gib=1",
            ]  # fmt: skip
            baseline = [PY, "-m", "trainwarden", "--version"]
            base_times, times, in_process = [], [], []
            failures: dict[str, int] = {}
            failed_runs = 0
            statuses: dict[str, set[str]] = {}
            for _ in range(args.runs):
                base_times.append(timed(baseline, env)[0])
                seconds, done = timed(preflight, env)
                times.append(seconds)
                report = json.loads(done.stdout)
                in_process.append(report["duration_seconds"])
                for check in report["checks"]:
                    statuses.setdefault(check["check"], set()).add(check["status"])
                    if check["status"] == "fail":
                        failures[check["check"]] = failures.get(check["check"], 0) + 1
                if done.returncode != 0:
                    failed_runs += 1
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} / {quantile(values, 0.99):.2f} / {max(values):.2f} s"

    seen = ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in sorted(statuses.items()))
    ratio = statistics.median(times) / statistics.median(base_times)
    rows = [
        ("runs", str(args.runs)),
        ("checks run (statuses seen)", seen),
        ("`trainwarden preflight` process wall time p50 / p99 / max", spread(times)),
        ("checks alone (the report's `duration_seconds`) p50 / p99 / max", spread(in_process)),
        ("baseline `python -m trainwarden --version` p50 / p99 / max", spread(base_times)),
        ("preflight process / baseline (p50)", f"{ratio:.2f}x"),
        ("false failures (runs exiting non-zero)", f"{failed_runs} / {args.runs} {failures or ''}".strip()),
    ]
    if args.markdown:
        print("| measure | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
    else:
        for name, value in rows:
            print(f"{name}: {value}")
    if quantile(times, 0.99) > 5.0 or failed_runs:
        sys.exit(1)


if __name__ == "__main__":
    main()
