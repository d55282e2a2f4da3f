"""Healing under a campaign of mixed faults: trainwarden (`run_job`) vs plain `torchrun --max-restarts`.

The same 2-rank CPU toy job (torchrun, gloo, checkpoint every 10 steps, ~0.1 s a step) meets the
same scripted faults, each firing once: hung ranks (a rank sleeps forever), crashed ranks (exit 1)
and a NaN burst (the loss times NaN; parameters turn NaN). It runs three times:

- **trainwarden**: under `trainwarden.daemon.run_cli.run_job` with the demo's config (learned stall
  timeout, floor 3 s; checkpoint-restart through the `supervise` backend; NaN: restart from the
  newest finite checkpoint and skip the bad batches; the restart budget raised to the campaign's
  fault count + 2 per 10 min, where the demo allows 4);
- **no faults**: the same job under plain torchrun without faults, the ceiling of the ratio below
  (it loses only startup, checkpoints and teardown; the 0.1 s sleep of each step stands in for
  compute and counts as productive);
- **baseline**: `torchrun --max-restarts N` alone. A crash restarts the worker group. A hang is only
  caught by the collective timeout of the surviving rank: gloo's default is 30 min (NCCL's watchdog
  10 min), far beyond a benchmark, so the baseline runs with `--pg-timeout` (default 30 s), a
  *tuned* watchdog; with the defaults each hang would cost 600 s (NCCL) or 1800 s (gloo) instead.
  Nothing notices a NaN: the job trains on with NaN parameters.

Measured per fault and per run:

- detection latency: fault → finding (trainwarden), or → the surviving rank's "Timed out waiting"
  (baseline hang) / torchrun's "Worker group FAILED" (baseline crash) log line; for hangs also as a
  ratio to the learned timeout and to NCCL's 600 s default;
- MTTR: detection → the first step completed after the restart;
- steps lost: steps done after the newest checkpoint that the resumed job repeats;
- effective training time ratio: productive step time (the final lineage's steps with a finite
  loss, each counted once) / wall time from launch to exit.

Run (a few minutes on 2 cores)::

    .venv/bin/python bench/healing.py                      # both, prints Markdown tables
    .venv/bin/python bench/healing.py --only trainwarden --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.config import load_config
from trainwarden.daemon.timeline import EventKind, TimelineEvent
from trainwarden.demo.narrator import Narrator
from trainwarden.demo.runner import free_port
from trainwarden.demo.scenario import JOB, ScriptedFault, config_text, toy_command
from trainwarden.plugins import plugin_groups

NCCL_WATCHDOG_SECONDS = 600.0
GLOO_DEFAULT_SECONDS = 1800.0
RESTART = ("checkpoint_restart",)
HANG_RULES = ("stall", "collective_stuck")
CRASH_RULES = ("process_exit", "process_gone")


def campaign(steps: int) -> list[ScriptedFault]:
    """Hang, crash, hang, crash, NaN (last, so the baseline's NaN is not undone by a later restart)."""
    kinds = [
        ("hang", 1, HANG_RULES),
        ("crash", 0, CRASH_RULES),
        ("hang", 0, HANG_RULES),
        ("crash", 1, CRASH_RULES),
        ("nan", 1, ("nonfinite",)),
    ]
    gap = steps // (len(kinds) + 1)
    return [
        ScriptedFault(kind, gap * (i + 1) // 10 * 10 + 5, rank, rules, RESTART, kind)
        for i, (kind, rank, rules) in enumerate(kinds)
    ]


@dataclass
class FaultResult:
    kind: str
    step: int
    detected_s: float | None = None  # fault -> detection
    timeout_s: float | None = None  # the learned stall timeout (trainwarden hangs)
    mttr_s: float | None = None  # detection -> first step after the restart
    steps_lost: int | None = None


@dataclass
class RunResult:
    name: str
    exit_code: int
    wall_s: float
    productive_s: float
    final_step: int | None
    final_loss_finite: bool
    faults: list[FaultResult] = field(default_factory=list)

    @property
    def etr(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def productive(events: list[dict[str, Any]]) -> tuple[float, int | None, bool]:
    """Step time of the final lineage (each step's last execution), finite losses only."""
    last: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == "step":
            last[int(e["step"])] = e
    total = sum(
        float(e.get("seconds", 0.0))
        for e in last.values()
        if isinstance(e.get("loss"), float) and math.isfinite(e["loss"])
    )
    final = max(last) if last else None
    finite = (
        final is not None
        and isinstance(last[final].get("loss"), float)
        and math.isfinite(last[final]["loss"])
    )
    return total, final, finite


def recovery(events: list[dict[str, Any]], fired: float, detected: float) -> tuple[float | None, int | None]:
    """(detection -> first step after the next start, steps lost) for a fault that restarts the job."""
    starts = [e for e in events if e.get("event") == "start"]
    began = max((float(e["time"]) for e in starts if float(e["time"]) <= fired), default=0.0)
    resumed = next((e for e in starts if float(e["time"]) > fired), None)
    if resumed is None:
        return None, None
    at = float(resumed["time"])
    first = next((e for e in events if e.get("event") == "step" and float(e["time"]) > at), None)
    mttr = None if first is None else float(first["time"]) - detected
    done = [int(e["step"]) for e in events if e.get("event") == "step" and began <= float(e["time"]) < at]
    start_step = int(resumed.get("step", 0))
    lost = max(0, (max(done) if done else start_step - 1) + 1 - start_step)
    return mttr, lost


def fault_times(events: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    return {(str(e["kind"]), int(e["step"])): float(e["time"]) for e in events if e.get("event") == "fault"}


# --- trainwarden --------------------------------------------------------------------------------


def run_trainwarden(root: Path, steps: int, faults: list[ScriptedFault]) -> RunResult:
    from trainwarden.daemon.run_cli import run_job  # noqa: PLC0415

    port = free_port()
    config_path = root / "config.toml"
    config_path.write_text(config_text(root, port, restarts_per_window=len(faults) + 2), encoding="utf-8")
    config = load_config(config_path, plugin_groups())
    command = toy_command(root, steps, faults, free_port())
    narrator = Narrator(io.StringIO(), time.time(), steps)
    log = (root / "job.log").open("ab")
    saved = os.dup(1), os.dup(2)
    start = time.time()
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        code = run_job(config, command, on_event=narrator.on_event, job=JOB)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
    wall = time.time() - start
    events = read_events(root / "events.jsonl")
    total, final, finite = productive(events)
    result = RunResult("trainwarden", code, wall, total, final, finite)
    fired_at = fault_times(events)
    timeline = sorted(narrator.events, key=lambda e: e.time)
    for fault in faults:
        fr = FaultResult(fault.kind, fault.step)
        fired = fired_at.get((fault.kind, fault.step))
        if fired is not None:
            hit = first_finding(timeline, fault.rules, fired)
            if hit is not None:
                fr.detected_s = hit.time - fired
                timeout = hit.data.get("timeout_seconds")
                fr.timeout_s = float(timeout) if isinstance(timeout, int | float) else None
                fr.mttr_s, fr.steps_lost = recovery(events, fired, hit.time)
        result.faults.append(fr)
    return result


def first_finding(events: list[TimelineEvent], rules: tuple[str, ...], after: float) -> TimelineEvent | None:
    return next(
        (e for e in events if e.kind is EventKind.FINDING_FIRED and e.rule in rules and e.time >= after), None
    )


# --- baseline -----------------------------------------------------------------------------------

# The surviving rank's collective timing out is the baseline's hang detection; torchrun's own
# "Worker group FAILED" (after its 30 s SIGTERM grace for the hung rank) is its crash detection.
_DETECTED = re.compile(r"Worker group (FAILED|UNHEALTHY)|Timed out waiting")


def baseline_command(root: Path, steps: int, faults: list[ScriptedFault], pg_timeout: float) -> list[str]:
    cmd = toy_command(root, steps, faults, free_port())
    cmd[cmd.index("--max-restarts") + 1] = str(len(faults) + 2)
    return [*cmd, "--pg-timeout", str(pg_timeout)]


def run_baseline(
    root: Path, steps: int, faults: list[ScriptedFault], pg_timeout: float, limit: float
) -> RunResult:
    env = {**os.environ, "LOGLEVEL": "INFO", "TRAINWARDEN_SOCKET": str(root / "no-daemon.sock")}
    env["TRAINWARDEN_CONTROL_DIR"] = str(root / "control")
    start = time.time()
    proc = subprocess.Popen(
        baseline_command(root, steps, faults, pg_timeout),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    failures: list[float] = []
    log = (root / "job.log").open("w", encoding="utf-8")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if _DETECTED.search(line):
                failures.append(time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        code = proc.wait()
    reader.join(10)
    log.close()
    wall = time.time() - start
    events = read_events(root / "events.jsonl")
    total, final, finite = productive(events)
    result = RunResult("baseline" if faults else "no faults", code, wall, total, final, finite)
    fired_at = fault_times(events)
    for fault in faults:
        fr = FaultResult(fault.kind, fault.step)
        fired = fired_at.get((fault.kind, fault.step))
        if fired is not None and fault.kind != "nan":
            detected = next((t for t in failures if t >= fired), None)
            if detected is not None:
                fr.detected_s = detected - fired
                fr.mttr_s, fr.steps_lost = recovery(events, fired, detected)
        result.faults.append(fr)
    return result


# --- report -------------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "s", digits: int = 1) -> str:
    return "not detected" if value is None else f"{value:.{digits}f}{unit}"


def report(runs: list[RunResult], pg_timeout: float) -> str:
    lines = [
        "| run | fault | step | detection | vs learned timeout | vs NCCL 600 s | MTTR | steps lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for f in run.faults:
            ratio = (
                "-" if f.detected_s is None or f.timeout_s is None else f"{f.detected_s / f.timeout_s:.2f}x"
            )
            nccl = (
                "-"
                if f.detected_s is None or f.kind != "hang"
                else f"{f.detected_s / NCCL_WATCHDOG_SECONDS:.4f}x"
            )
            lines.append(
                f"| {run.name} | {f.kind} | {f.step} | {_fmt(f.detected_s)} | {ratio} | {nccl} | "
                f"{'-' if f.mttr_s is None else f'{f.mttr_s:.1f}s'} | "
                f"{'-' if f.steps_lost is None else f.steps_lost} |"
            )
    lines += [
        "",
        (
            "| run | exit | wall | productive step time | effective training time ratio | final step "
            "| final loss finite |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.exit_code} | {run.wall_s:.1f}s | {run.productive_s:.1f}s | {run.etr:.2f} | "
            f"{'-' if run.final_step is None else run.final_step + 1} | "
            f"{'yes' if run.final_loss_finite else 'no'} |"
        )
    base = next((r for r in runs if r.name == "baseline"), None)
    if base is not None:
        caught = sum(1 for f in base.faults if f.kind == "hang" and f.detected_s is not None)
        for name, timeout in (
            ("NCCL watchdog", NCCL_WATCHDOG_SECONDS),
            ("gloo default", GLOO_DEFAULT_SECONDS),
        ):
            wall = base.wall_s + caught * (timeout - pg_timeout)
            lines.append(
                f"\nbaseline projected with the {name} ({timeout:.0f} s) instead of {pg_timeout:.0f} s: "
                f"wall {wall:.0f}s, effective training time ratio {base.productive_s / wall:.3f}"
            )
    tw = next((r for r in runs if r.name == "trainwarden"), None)
    if tw is not None:
        hangs = [f for f in tw.faults if f.kind == "hang" and f.detected_s is not None]
        if hangs:
            lines.append(
                f"\ntrainwarden hang detection: median "
                f"{statistics.median(f.detected_s or 0 for f in hangs):.1f}s "
                f"vs {NCCL_WATCHDOG_SECONDS:.0f}s NCCL watchdog / {GLOO_DEFAULT_SECONDS:.0f}s gloo default; "
                f"baseline ran with --pg-timeout {pg_timeout:.0f}s."
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--pg-timeout", type=float, default=30.0, help="baseline's gloo collective timeout")
    parser.add_argument("--only", choices=["trainwarden", "baseline", "clean"], default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds before the baseline is killed")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' directories here")
    args = parser.parse_args()
    faults = campaign(args.steps)
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="tw-bench-healing-") as scratch:
        tmp = str(args.keep) if args.keep is not None else scratch
        if args.only in (None, "trainwarden"):
            root = Path(tmp) / "trainwarden"
            root.mkdir(parents=True)
            runs.append(run_trainwarden(root, args.steps, faults))
            print(f"trainwarden: exit {runs[-1].exit_code} in {runs[-1].wall_s:.0f}s", file=sys.stderr)
        if args.only in (None, "baseline"):
            root = Path(tmp) / "baseline"
            root.mkdir(parents=True)
            runs.append(run_baseline(root, args.steps, faults, args.pg_timeout, args.limit))
            print(f"baseline: exit {runs[-1].exit_code} in {runs[-1].wall_s:.0f}s", file=sys.stderr)
        if args.only in (None, "clean"):
            root = Path(tmp) / "clean"
            root.mkdir(parents=True)
            runs.append(run_baseline(root, args.steps, [], args.pg_timeout, args.limit))
            print(f"no faults: exit {runs[-1].exit_code} in {runs[-1].wall_s:.0f}s", file=sys.stderr)
    print(
        f"campaign: {args.steps} steps, faults " + ", ".join(f"{f.kind}@{f.step}:r{f.rank}" for f in faults)
    )
    print(report(runs, args.pg_timeout))
    if args.json is not None:
        args.json.write_text(
            json.dumps([{**asdict(r), "etr": r.etr} for r in runs], indent=2), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
