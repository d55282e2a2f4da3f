"""One local rank of the preflight's collective check: timed all-reduces, rank 0 prints the result.

Run as a separate process (`python -m trainwarden.preflight.allreduce_worker`), so torch is
imported only here, never by the daemon or the preflight itself. gloo on CPU; NCCL, one GPU per
rank, where CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    """Join the group, all-reduce `--bytes` `--iterations` times, rank 0 prints JSON."""
    parser = argparse.ArgumentParser(prog="allreduce_worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415 - only in this process
    import torch.distributed as dist  # noqa: PLC0415

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.world_size
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", args.rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=args.timeout),
    )
    try:
        tensor = torch.ones(max(1, args.bytes // 4), dtype=torch.float32, device=device)
        dist.all_reduce(tensor)  # warm-up: connections and buffers
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        for _ in range(args.iterations):
            dist.all_reduce(tensor)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.iterations
        expected = float(args.world_size ** (args.iterations + 1))
        correct = bool(torch.allclose(tensor[:1].cpu(), torch.tensor([expected])))
    finally:
        dist.destroy_process_group()
    if args.rank == 0:
        size = tensor.numel() * 4
        n = args.world_size
        result = {
            "backend": backend,
            "bytes": size,
            "seconds_per_op": seconds,
            # nccl-tests' bus bandwidth: what each link carries in a ring all-reduce.
            "bus_bytes_per_second": size / seconds * 2 * (n - 1) / n,
            "correct": correct,
        }
        print(json.dumps(result), flush=True)  # noqa: T201 - the result, read by the parent
    return 0


if __name__ == "__main__":
    sys.exit(main())
