"""Optional (`--collective`): a short all-reduce among this node's local ranks against a floor.

The ranks are separate processes (`allreduce_worker`), so neither this process nor the daemon
imports torch; gloo on CPU, NCCL on a GPU node. What is measured is nccl-tests' bus bandwidth
of a ring all-reduce of `collective_bytes`, and the result must also be numerically right.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from trainwarden.preflight.model import MIB, CheckResult, PreflightOptions, Status

COLLECTIVE = "collective"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_collective(options: PreflightOptions) -> list[CheckResult]:
    """Skipped unless asked; else spawn the ranks, bounded by the preflight timeout, and judge the rate."""
    if not options.collective:
        return [CheckResult(COLLECTIVE, Status.SKIPPED, "not asked for (--collective)")]
    started = time.monotonic()
    port, n = _free_port(), options.collective_ranks
    budget = max(1.0, options.timeout_seconds - 1.0)
    argv = [sys.executable, "-m", "trainwarden.preflight.allreduce_worker", f"--world-size={n}"]
    argv += [f"--port={port}", f"--bytes={options.collective_bytes}", f"--timeout={budget:g}"]
    ranks = [
        subprocess.Popen([*argv, f"--rank={rank}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(n)
    ]
    outputs: list[tuple[str, str]] = []
    try:
        for proc in ranks:
            left = max(0.1, budget - (time.monotonic() - started))
            outputs.append(proc.communicate(timeout=left))
    except subprocess.TimeoutExpired:
        return [CheckResult(COLLECTIVE, Status.FAIL, f"all-reduce did not finish in {budget:g} s", budget)]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    took = time.monotonic() - started
    failed = [
        (i, p.returncode, err)
        for i, (p, (_, err)) in enumerate(zip(ranks, outputs, strict=True))
        if p.returncode
    ]
    if failed:
        rank, code, err = failed[0]
        tail = err.strip().splitlines()[-1:] or ["no output"]
        return [CheckResult(COLLECTIVE, Status.FAIL, f"rank {rank} exited {code}: {tail[0][:200]}", took)]
    try:
        result = json.loads(outputs[0][0].strip().splitlines()[-1])
        rate, backend, correct = (
            float(result["bus_bytes_per_second"]),
            str(result["backend"]),
            result["correct"],
        )
    except (ValueError, KeyError, IndexError, TypeError):
        return [
            CheckResult(COLLECTIVE, Status.FAIL, f"rank 0 printed no result: {outputs[0][0][:200]!r}", took)
        ]
    detail: dict[str, float | str] = {"bus_bytes_per_second": rate, "backend": backend}
    floor = options.min_collective_bytes_per_second
    size = options.collective_bytes / MIB
    text = f"{backend} all-reduce of {size:g} MiB over {n} ranks: {rate / MIB:.0f} MiB/s bus bandwidth"
    if correct is not True:
        return [CheckResult(COLLECTIVE, Status.FAIL, f"{text}, but the sum is wrong", took, detail)]
    status = Status.PASS if rate >= floor else Status.FAIL
    return [CheckResult(COLLECTIVE, status, f"{text} (floor {floor / MIB:g} MiB/s)", took, detail)]
