"""Collective timing in a real 2-process gloo group, reported to a real training collector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from support import free_port
from training_support import collect_into, running_collector, wait_until
from trainwarden.client.collectives import tensor_bytes, time_collectives

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import torch.distributed as dist
    from trainwarden.client import Reporter
    from trainwarden.client.collectives import time_collectives

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    original = dist.all_reduce
    reporter = Reporter.from_env(job="coll", socket_path=sys.argv[1], control_dir="/nonexistent")
    timer = time_collectives(reporter)
    t = torch.ones(1024)
    dist.all_reduce(t)
    gathered = [torch.empty(1024) for _ in range(2)]
    dist.all_gather(gathered, t)
    dist.broadcast(t, src=0)
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    if rank == 1:
        time.sleep(float(sys.argv[2]))  # rank 0 sits in the barrier meanwhile
    dist.barrier()
    timer.uninstall()
    restored = dist.all_reduce is original
    reporter.close(timeout=10)
    dist.destroy_process_group()
    print(json.dumps({"sum": float(t.sum()), "restored": restored, "dropped": reporter.dropped}))
    """
)


def test_gloo_collectives_are_timed_and_a_waiting_barrier_shows_in_flight(tmp_path: Path) -> None:
    """Every wrapped op is counted once per rank, results are unchanged, and a stuck barrier ages."""
    port = free_port()
    with running_collector(tmp_path) as collector:
        procs = []
        for rank in range(2):
            env = os.environ | {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            cmd = [sys.executable, "-c", RANK_SCRIPT, str(collector.socket_path), "1.5"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))

        def barrier_in_flight() -> bool:
            store = collect_into(collector)
            age = store.value("trainwarden_train_collective_in_flight_seconds", job="coll", rank="0")
            return age is not None and age > 0.3

        wait_until(barrier_in_flight, timeout=60, what="rank 0's barrier to show as in flight")
        results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        # all_reduce(ones)=2, broadcast keeps 2, async all_reduce=4 per element.
        assert [r["sum"] for r in results] == [4096.0, 4096.0]
        assert all(r["restored"] for r in results)
        assert [r["dropped"] for r in results] == [0, 0]
        wait_until(lambda: collector.status()["received"] == 2 * (1 + 2 * 5 + 1))
        store = collect_into(collector)
        counts = {
            op: store.value("trainwarden_train_collective_duration_seconds_count", job="coll", op=op)
            for op in ("all_reduce", "all_gather", "broadcast", "barrier")
        }
        assert counts == {"all_reduce": 4, "all_gather": 2, "broadcast": 2, "barrier": 2}
        for rank in ("0", "1"):
            assert store.value("trainwarden_train_collective_in_flight_seconds", job="coll", rank=rank) == 0
        barrier_sum = store.value(
            "trainwarden_train_collective_duration_seconds_sum", job="coll", op="barrier"
        )
        assert barrier_sum is not None
        assert barrier_sum >= 1.0  # rank 0 waited for rank 1's sleep


class _Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, int, int | None]] = []

    def collective(self, op: str, event: str, seq: int, nbytes: int | None, seconds: float | None) -> None:
        self.records.append((op, event, seq, nbytes))


def test_failing_collective_still_reports_its_end() -> None:
    """A collective that raises (no process group) sends begin and end, so it never looks stuck."""
    sink = _Sink()
    with time_collectives(sink, ("all_reduce",)), pytest.raises((RuntimeError, ValueError)):
        dist.all_reduce(torch.ones(4))
    assert sink.records == [("all_reduce", "begin", 0, 16), ("all_reduce", "end", 0, 16)]
    assert not getattr(dist.all_reduce, "__trainwarden_timed__", False)


def test_tensor_bytes_counts_nested_lists() -> None:
    """Bytes are summed over tensors in lists, by element size."""
    assert tensor_bytes([torch.ones(4), torch.ones(2, dtype=torch.float64)], None) == 32
    with pytest.raises(ValueError, match="cannot time"):
        time_collectives(_Sink(), ("send",))
