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
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from goodput_support import outside, saved  # noqa: E402 - after the path insert
from heal_support import JOB, start_run  # noqa: E402
from trainwarden.goodput_report import goodput_lines  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="crash runs (plus one healthy run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
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
