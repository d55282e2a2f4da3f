"""Cost of GPU collection on FakeNvml, and the series count of a full 8-GPU node.

Measures, on the shipped `h100-sxm-8gpu` snapshot:

1. one NVML sample of one GPU (`GpuCollector.sample_gpu`): wall time and NVML calls it makes;
2. one full collection of 8 GPUs (`GpuCollector.collect`), event thread running;
3. the series a node exports: a real `trainwarden daemon` process on FakeNvml with 8 GPUs, 8
   training ranks (8 processes) connected over its socket (steps, every phase, a checkpoint,
   collectives), the 4-port NDR InfiniBand fixture, NCCL Inspector records for every rank and 4
   collectives, and XIDs in the kernel log; host series come from this machine's real /proc.
   Its /metrics is scraped and counted by family group.

It also times NCCL Inspector ingest (40,000 JSON records from 8 ranks in one run).

The fake answers from memory, so (1) and (2) are trainwarden's own overhead; a real driver adds
roughly 10-100 us per NVML call (not measured here: no GPU on the build machine).

    .venv/bin/python bench/gpu_collection.py              # 2000 samples, 500 collections
    .venv/bin/python bench/gpu_collection.py --repeat 200 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from training_support import hello  # noqa: E402 - tests/ on the path first
from trainwarden.collectors.base import CollectorContext, RankIdentity  # noqa: E402
from trainwarden.collectors.gpu import GpuCollector, GpuOptions  # noqa: E402
from trainwarden.collectors.nccl_inspector import NcclInspectorCollector, NcclInspectorOptions  # noqa: E402
from trainwarden.protocol import default_socket_path, encode  # noqa: E402
from trainwarden.testing import FakeNvml  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
RANKS = 8
COLLECTIVES = ("AllReduce", "AllGather", "ReduceScatter", "Broadcast")
SERIES_BUDGET = 2500


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_sampling(repeat: int) -> dict[str, float]:
    context = CollectorContext()
    for rank in range(RANKS):
        context.pid_owners.set(41001 + rank, RankIdentity("llm", rank, rank))
    fake = FakeNvml.shipped("h100-sxm-8gpu")
    collector = GpuCollector(GpuOptions(event_poll_ms=100), context, fake)
    collector.start()
    try:
        collector.collect()  # first run logs the unsupported fields
        before = sum(fake.calls.values())
        per_gpu: list[float] = []
        for i in range(repeat):
            start = time.perf_counter()
            collector.sample_gpu(i % 8)
            per_gpu.append(time.perf_counter() - start)
        calls_per_gpu = (sum(fake.calls.values()) - before) / repeat
        full: list[float] = []
        series = 0
        for _ in range(max(1, repeat // 4)):
            start = time.perf_counter()
            series = len(list(collector.collect()))
            full.append(time.perf_counter() - start)
    finally:
        collector.close()
    return {
        "sample_one_gpu_median_us": statistics.median(per_gpu) * 1e6,
        "sample_one_gpu_p99_us": percentile(per_gpu, 0.99) * 1e6,
        "nvml_calls_per_gpu_sample": calls_per_gpu,
        "collect_8_gpus_median_ms": statistics.median(full) * 1e3,
        "collect_8_gpus_p99_ms": percentile(full, 0.99) * 1e3,
        "gpu_collector_series_8_gpus": series,
    }


def bench_inspector(records_per_rank: int) -> dict[str, float]:
    """Ingest cost of NCCL Inspector JSON records (8 ranks' logs appended since the last run)."""
    directory = Path(tempfile.mkdtemp(prefix="tw-bench-nccl-"))
    context = CollectorContext()
    for rank in range(RANKS):
        context.pid_owners.set(50000 + rank, RankIdentity("llm", rank, rank))
    collector = NcclInspectorCollector(NcclInspectorOptions(enabled=True, directory=directory), context)
    collector.start()
    for rank in range(RANKS):
        lines = (inspector_record(rank, 50000 + rank, "AllReduce", n) for n in range(records_per_rank))
        (directory / f"node01-pid{50000 + rank}.log").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    collector.collect()
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory)
    return {
        "inspector_records": RANKS * records_per_rank,
        "inspector_us_per_record": elapsed / (RANKS * records_per_rank) * 1e6,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        counts[family.name] += len(family.samples)
    return dict(counts)


def wait(predicate: object, timeout: float = 30.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("timed out waiting for the daemon")


def inspector_record(rank: int, pid: int, coll: str, sn: int) -> str:
    return json.dumps(
        {
            "header": {"id": "0x7f8c496ae9f661", "rank": rank, "n_ranks": RANKS, "nnodes": 1},
            "metadata": {"inspector_output_format_version": "v4.0", "hostname": "node01", "pid": pid},
            "coll_perf": {
                "coll": coll,
                "coll_sn": sn,
                "coll_msg_size_bytes": 1 << 30,
                "coll_exec_time_us": 4000,
                "coll_algobw_gbs": 268.4,
                "coll_busbw_gbs": 469.7,
            },
        }
    )


def rank_client(path: str, rank: int) -> None:
    """One training rank in its own process (the daemon learns its pid from SO_PEERCRED)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    records = [hello(rank, job="llm", world_size=RANKS)]
    records += [
        {"type": "step", "step": s, "step_seconds": 0.4, "loss": 2.0, "grad_norm": 0.7, "lr": 3e-4}
        | {"samples": 256, "tokens": 1 << 20}
        for s in range(20)
    ]
    for phase in ("checkpoint", "eval", "data", "init"):
        records += [
            {"type": "phase", "phase": phase, "event": "begin"},
            {"type": "phase", "phase": phase, "event": "end", "seconds": 1.0},
        ]
    records.append({"type": "checkpoint", "step": 19, "path": "/ckpt/19"})
    for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast"):
        records += [
            {"type": "collective", "op": op, "event": "begin", "seq": 1, "bytes": 1 << 30},
            {"type": "collective", "op": op, "event": "end", "seq": 1, "seconds": 0.004},
        ]
    sock.sendall(b"".join(encode(r) for r in records))
    print(os.getpid(), flush=True)
    time.sleep(3600)


def node_series() -> dict[str, int]:
    """Run a daemon on the fixtures with 8 ranks connected, scrape it, and count series by family."""
    tmp = Path(tempfile.mkdtemp(prefix="tw-bench-gpu-"))
    dev = tmp / "dev"
    dev.mkdir()
    kmsg = dev / "kmsg"
    kmsg.write_text("")
    inspector = tmp / "nccl"
    inspector.mkdir()
    runtime = tmp / "run"
    config = tmp / "config.toml"
    config.write_text(
        f"[paths]\ndevfs = '{dev}'\n\n"
        + "".join(
            f"[collectors.{name}]\ninterval_seconds = 0.5\n\n" for name in ("gpu", "kmsg", "xid", "training")
        )
        + f"[collectors.nccl_inspector]\nenabled = true\ndirectory = '{inspector}'\ninterval_seconds = 0.5\n"
    )
    port = free_port()
    env = dict(os.environ, TRAINWARDEN_NVML_FIXTURE="h100-sxm-8gpu")
    cmd = [
        sys.executable, "-m", "trainwarden.daemon.cli", "daemon", "--config", str(config),
        "--listen", f"127.0.0.1:{port}", "--runtime-dir", str(runtime), "--state-dir", str(tmp / "state"),
        "--path.sysfs", str(FIXTURES / "infiniband" / "ndr_4port" / "sys"),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[subprocess.Popen[bytes]] = []
    try:
        wait(lambda: "trainwarden_gpu_up" in scrape(url))
        path = default_socket_path(runtime)
        ranks.extend(
            subprocess.Popen(
                [sys.executable, __file__, "--rank-client", str(path), str(r)], stdout=subprocess.PIPE
            )
            for r in range(RANKS)
        )
        pids = [int(r.stdout.readline()) for r in ranks if r.stdout is not None]
        for rank, pid in enumerate(pids):
            with (inspector / f"node01-pid{pid}.log").open("w") as handle:
                for n, coll in enumerate(COLLECTIVES):
                    handle.write(inspector_record(rank, pid, coll, n) + "\n")
        with kmsg.open("a") as handle:
            handle.write("4,1,1,-;NVRM: Xid (PCI:0000:18:00): 13, pid=1, name=python, Graphics Exception\n")
            handle.write(
                "4,2,2,-;NVRM: Xid (PCI:0000:db:00): 79, pid=1, name=python, GPU has fallen off the bus.\n"
            )
        wait(lambda: scrape(url).get("trainwarden_train_step", 0) == RANKS)
        wait(lambda: "trainwarden_gpu_xid_errors" in scrape(url))
        time.sleep(1.5)
        return scrape(url)
    finally:
        for rank_proc in ranks:
            rank_proc.kill()
            rank_proc.wait()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


GROUPS = (
    ("trainwarden_gpu_xid", "xid"),
    ("trainwarden_gpu_", "gpu (NVML)"),
    ("trainwarden_infiniband_", "infiniband"),
    ("trainwarden_nccl_", "nccl_inspector"),
    ("trainwarden_kmsg_", "kmsg"),
    ("trainwarden_kernel_", "kmsg"),
    ("trainwarden_train_", "training"),
    ("trainwarden_client_", "training"),
    ("trainwarden_host_", "host"),
)


def group_of(family: str) -> str:
    for prefix, group in GROUPS:
        if family.startswith(prefix):
            return group
    return "daemon/other"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeat", type=int, default=2000, help="GPU samples to time (collections: a quarter)"
    )
    parser.add_argument("--markdown", action="store_true", help="print tables for docs/METRICS.md")
    parser.add_argument("--rank-client", nargs=2, metavar=("SOCKET", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_client:
        rank_client(args.rank_client[0], int(args.rank_client[1]))
        return
    sampling = bench_sampling(args.repeat) | bench_inspector(5000)
    families = node_series()
    groups: Counter[str] = Counter()
    for family, count in families.items():
        groups[group_of(family)] += count
    total = sum(groups.values())
    if args.markdown:
        print("| measure | value |\n|---|---|")
        for key, value in sampling.items():
            print(f"| {key} | {value:.1f} |")
        print("\n| group | series |\n|---|---|")
        for group, count in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {group} | {count} |")
        print(f"| **total** | **{total}** (budget {SERIES_BUDGET}) |")
    else:
        print(
            json.dumps(
                {"sampling": sampling, "series_by_group": dict(groups), "series_total": total}, indent=1
            )
        )
    if total > SERIES_BUDGET:
        raise SystemExit(f"node exports {total} series, over the {SERIES_BUDGET} budget")


if __name__ == "__main__":
    main()
