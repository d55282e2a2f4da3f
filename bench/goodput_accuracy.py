"""The goodput the daemon reports vs the goodput measured from outside (the job's own step log).

Runs the 2-rank CPU toy job (torchrun, gloo, checkpoint every 20 steps, 0.05 s sleep a step)
under `trainwarden run` with actions on, `--runs` times with a crash injected from outside
(SIGKILL of rank 1 once step 50 is logged) and once without a fault. After each run it reads the
totals the daemon saved in its state directory and the toy's `--events` log (rank 0: a line per
step with its wall time and pid, and the blocking time of each checkpoint save), and prints, per
run, both sides' goodput ratio (productive / wall), their difference as a share of the wall, steps
repeated, and the seconds lost to the restart (daemon: detecting + restarting; outside: the gap
from the old process's last step line to the new one's first).

    .venv/bin/python bench/goodput_accuracy.py            # 3 crash runs + 1 healthy, Markdown table
    .venv/bin/python bench/goodput_accuracy.py --runs 1 --json out.json
    .venv/bin/python bench/goodput_accuracy.py --overhead  # the accounting's cost on the socket thread

`--overhead` instead measures what the accounting costs the daemon: the same stream of step
records through a real `TrainingCollector` socket with and without the accountant listening,
interleaved, as the ratio of the time to apply them (the baseline measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from goodput_support import outside, saved  # noqa: E402 - after the path insert
from heal_support import JOB, start_run  # noqa: E402
from training_support import hello  # noqa: E402
from trainwarden.collectors.base import CollectorContext  # noqa: E402
from trainwarden.collectors.training import TrainingCollector, TrainingOptions  # noqa: E402
from trainwarden.daemon.goodput import GoodputAccountant  # noqa: E402
from trainwarden.goodput_report import goodput_lines  # noqa: E402
from trainwarden.protocol import encode  # noqa: E402
from trainwarden.store import Store  # noqa: E402

STEPS = 130
CRASH_AFTER = 50


@dataclass
class Result:
    """One run, both views."""

    fault: str
    daemon_ratio: float
    outside_ratio: float
    ratio_gap_of_wall: float
    daemon_wall: float
    outside_wall: float
    daemon_repeated_steps: int
    outside_repeated_steps: int
    daemon_restart_seconds: float
    outside_restart_seconds: float
    restarts: dict[str, int]
    seconds: dict[str, float]


def toy_args(tmp: Path) -> list[str]:
    return [
        "--steps", str(STEPS), "--ckpt-dir", str(tmp / "ckpt"), "--ckpt-every", "20",
        "--step-sleep", "0.05", "--events", str(tmp / "events.jsonl"), "--out", str(tmp / "out"),
    ]  # fmt: skip


def one_run(tmp: Path, *, crash: bool) -> Result:
    """Run the toy under `trainwarden run`, optionally SIGKILL rank 1, and compare both views."""
    tmp.mkdir(parents=True)
    run = start_run(tmp, toy_args(tmp))
    if crash:
        run.proc.wait_for(rf"^STEP {CRASH_AFTER} ", 180)
        os.kill(run.rank_pid(1), signal.SIGKILL)
    code = run.proc.wait(300)
    if code != 0:
        raise SystemExit(f"run failed ({code}):\n{run.proc.output()}")
    totals = saved(run.state)
    log = outside(tmp / "events.jsonl")
    wall = sum(totals.seconds.values())
    daemon_ratio = totals.seconds["productive"] / wall
    outside_ratio = log.productive / log.wall
    return Result(
        fault="crash (SIGKILL rank 1)" if crash else "none",
        daemon_ratio=daemon_ratio,
        outside_ratio=outside_ratio,
        ratio_gap_of_wall=abs(daemon_ratio - outside_ratio),
        daemon_wall=wall,
        outside_wall=log.wall,
        daemon_repeated_steps=totals.steps_repeated,
        outside_repeated_steps=log.repeated_steps,
        daemon_restart_seconds=totals.seconds["detecting"] + totals.seconds["restarting"],
        outside_restart_seconds=sum(log.restart_gaps),
        restarts=dict(totals.restarts),
        seconds=dict(totals.seconds),
    )


def status_of(result: Result) -> dict[str, object]:
    """A run's saved totals in the shape of /status's goodput section (what the table prints)."""
    return {
        "mode": "finished",
        "ratio": result.daemon_ratio,
        "wall_seconds": result.daemon_wall,
        "seconds": result.seconds,
        "steps_repeated": result.daemon_repeated_steps,
        "restarts": result.restarts,
    }


def table(results: list[Result]) -> str:
    """Markdown rows, one per run."""
    lines = [
        (
            "| fault | goodput daemon | goodput outside | difference | wall daemon / outside | "
            "steps repeated daemon / outside | restart s daemon / outside | restarts |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        restarts = ", ".join(f"{k}={v}" for k, v in sorted(r.restarts.items())) or "0"
        lines.append(
            f"| {r.fault} | {r.daemon_ratio:.3f} | {r.outside_ratio:.3f} | {r.ratio_gap_of_wall:.1%} | "
            f"{r.daemon_wall:.2f} / {r.outside_wall:.2f} | {r.daemon_repeated_steps} / "
            f"{r.outside_repeated_steps} | {r.daemon_restart_seconds:.2f} / {r.outside_restart_seconds:.2f} "
            f"| {restarts} |"
        )
    return "\n".join(lines)


def apply_seconds(records: int, *, accounted: bool) -> float:
    """Seconds for a started collector to apply `records` step records sent over its socket."""
    with tempfile.TemporaryDirectory(prefix="tw-goodput-cost-") as root:
        accountant = GoodputAccountant(Path(root) / "state", Store(), time.time)
        listeners = (accountant.on_record,) if accounted else ()
        context = CollectorContext(runtime_dir=Path(root), state_dir=Path(root), record_listeners=listeners)
        collector = TrainingCollector(TrainingOptions(), context)
        collector.start()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(collector.socket_path))
            payload = encode(hello(0, job="bench", world_size=1)) + b"".join(
                encode({"type": "step", "step": s, "step_seconds": 0.1, "loss": 1.0}) for s in range(records)
            )
            began = time.perf_counter()
            sock.sendall(payload)
            while collector.status()["received"] < records + 1:
                time.sleep(0.001)
            elapsed = time.perf_counter() - began
            sock.close()
        finally:
            collector.close()
            accountant.close()
    return elapsed


def overhead(records: int = 50_000, rounds: int = 7) -> None:
    """Print the median time to apply `records` with and without accounting, and their ratio."""
    plain, accounted = [], []
    for _ in range(rounds):
        plain.append(apply_seconds(records, accounted=False))
        accounted.append(apply_seconds(records, accounted=True))
    base, with_goodput = statistics.median(plain), statistics.median(accounted)
    print(f"{records} step records, median of {rounds} interleaved rounds:")
    print(f"  collector alone:     {base:.3f} s ({records / base:,.0f} records/s)")
    print(f"  with the accountant: {with_goodput:.3f} s ({records / with_goodput:,.0f} records/s)")
    extra_us = (with_goodput - base) / records * 1e6
    print(f"  ratio: {with_goodput / base:.3f} ({extra_us:.1f} us more per record)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="crash runs (plus one healthy run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--overhead", action="store_true", help="measure the accounting's cost instead")
    args = parser.parse_args()
    if args.overhead:
        overhead()
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="tw-goodput-") as root:
        for i in range(args.runs):
            results.append(one_run(Path(root) / f"crash{i}", crash=True))
            print(table(results[-1:]).splitlines()[-1], flush=True)
        results.append(one_run(Path(root) / "healthy", crash=False))
    print(table(results))
    last_crash = results[-2] if len(results) > 1 else results[-1]
    print("\nThe last crash run's saved totals in `trainwarden status`'s goodput table:\n")
    print("\n".join(goodput_lines({"jobs": {JOB: status_of(last_crash)}})))
    worst = max(r.ratio_gap_of_wall for r in results)
    print(f"\nworst |daemon - outside| goodput: {worst:.2%} of the wall (target: within 2 %)")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
