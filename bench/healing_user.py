"""Healing a user's own trainer (tests/user_trainer.py, documented API only) through faults from outside.

The trainer (a small conv net, 2 ranks under torchrun, gloo, DDP, AdamW with warm-up + cosine, a
checkpoint every 10 steps, `--step-sleep` standing in for compute) meets, in one run under
`trainwarden run` with actions on and the default rules and routes:

- a NaN batch (its data slice on rank 1 is NaN: the parameters turn NaN),
- a hung rank (SIGSTOP of rank 1's process),
- a huge batch (rank 0's slice x 1000: a grad-norm spike the clipper absorbs),
- a crashed rank (SIGKILL of rank 0's process).

Two runs side by side: **trainwarden** (the faults above) and **no faults** (the same trainer and data
without the daemon, skipping the NaN batch through the documented control file): the ceiling, and the
reference the healed run must equal bit for bit.

Measured per fault: detection (fault → the daemon's finding, from `findings.jsonl` times), time back to
training (fault → the first step completed after the restart), steps repeated (steps completed twice);
per run: wall time, restarts taken, whether the final parameters equal the reference.

    .venv/bin/python bench/healing_user.py            # ~3-5 min on 2 cores; prints Markdown tables
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from heal_support import TRAINWARDEN, config_text  # noqa: E402
from toy_launch import torchrun_command, toy_env  # noqa: E402
from user_support import make_data, reference, trainer_args  # noqa: E402

STEP = re.compile(r"^STEP (\d+) ")


class Timed:
    """A process whose output lines are kept with their arrival times."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.popen = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait_step(self, step: int, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in self.lines:
                match = STEP.match(line)
                if match and int(match.group(1)) >= step:
                    return when
            time.sleep(0.02)
        raise SystemExit(f"step {step} never came; last lines:\n" + "\n".join(t for _, t in self.lines[-40:]))

    def steps(self) -> list[tuple[float, int]]:
        return [(when, int(m.group(1))) for when, line in self.lines if (m := STEP.match(line))]


def rank_pid(root_pid: int, rank: int) -> int:
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if "user_trainer" in cmdline and child.environ().get("RANK") == str(rank):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise SystemExit(f"no rank {rank} worker")


def fired(state: Path) -> list[dict[str, object]]:
    path = state / "findings.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["event"] == "firing"]  # the engine's FindingLog word


RULES = {
    "nan": ("nonfinite",),
    "hang": ("stall", "collective_stuck"),
    "spike": ("spike",),
    "crash": ("process_gone", "process_exit"),
}


def fault_row(
    kind: str,
    step: int,
    at: float,
    until: float,
    findings: list[dict[str, object]],
    steps_seen: list[tuple[float, int]],
) -> str:
    """One fault's row: its own rules' first finding, and training again, both before the next fault.

    A restart shows as the step counter dropping; without one (the spike, absorbed by the clipper)
    training goes on at the next step, and nothing after the next fault is this fault's doing.
    """
    rules = RULES[kind]
    hit = next(
        (f for f in findings if f["rule"] in rules and at - 0.5 <= float(str(f["time"])) < until),
        None,
    )
    detected = "-" if hit is None else f"{float(str(hit['time'])) - at:.1f}s ({hit['rule']})"
    back, repeated, last = "-", 0, None
    window = [(when, seen) for when, seen in steps_seen if when < until]
    for seen_at, seen in window:
        if seen_at < at:
            last = seen
            continue
        if last is not None and seen <= last:  # the step counter dropped: the restarted run's first step
            back = f"{seen_at - at:.1f}s"
            repeated = last - seen + 1
            break
        last = seen
    else:
        after = next(((when, seen) for when, seen in window if when >= at and seen > step), None)
        if after is not None:
            back = f"{after[0] - at:.1f}s (no restart)"
    return f"| {kind} | {step} | {detected} | {back} | {repeated} |"


def run(root: Path, steps: int, sleep: float) -> tuple[str, str]:
    nan_step, hang_at, spike_step, crash_at = (int(steps * f) for f in (0.25, 0.4, 0.55, 0.75))
    data = make_data(root, steps, {nan_step: ("nan", 1), spike_step: ("spike", 0)})
    started = time.time()
    expected = reference(root / "reference", data, steps, "--step-sleep", str(sleep), skip=(nan_step,))
    reference_wall = time.time() - started

    config = root / "config.toml"
    config.write_text(config_text(root), encoding="utf-8")
    env = toy_env(root)
    for name in ("TRAINWARDEN_SOCKET", "TRAINWARDEN_CONTROL_DIR"):
        env.pop(name)
    args = trainer_args(data, steps, "--step-sleep", str(sleep), ckpt=root / "ckpt", out=root / "out")
    started = time.time()
    proc = Timed([*TRAINWARDEN, "run", "--config", str(config), "--", *torchrun_command(args)], env)
    faults: list[tuple[str, int, float]] = [("nan", nan_step, proc.wait_step(nan_step - 1))]
    when = proc.wait_step(hang_at)
    os.kill(rank_pid(proc.popen.pid, 1), signal.SIGSTOP)
    faults.append(("hang", hang_at, when))
    faults.append(("spike", spike_step, proc.wait_step(spike_step - 1)))
    when = proc.wait_step(crash_at)
    os.kill(rank_pid(proc.popen.pid, 0), signal.SIGKILL)
    faults.append(("crash", crash_at, when))
    code = proc.popen.wait(600)
    wall = time.time() - started

    journal = subprocess.run(
        [*TRAINWARDEN, "actions", "--state-dir", str(root / "state"), "--json"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    decisions = [json.loads(line) for line in journal if line.strip()]
    taken = [e for e in decisions if e.get("decision") == "taken"]
    # The rule engine logs its findings; a crash seen by the exit watcher is decided on at once and
    # is only in the journal (its decision's time), so both count as the fault's detection.
    findings = sorted(
        [*fired(root / "state"), *({"rule": e["rule"], "time": e["time"]} for e in decisions)],
        key=lambda f: float(str(f["time"])),
    )
    steps_seen = proc.steps()
    rows = []
    for i, (kind, step, at) in enumerate(faults):
        until = faults[i + 1][2] if i + 1 < len(faults) else float("inf")
        rows.append(fault_row(kind, step, at, until, findings, steps_seen))
    outcome = json.loads((root / "out" / "final.json").read_text()) if code == 0 else {}
    per_fault = "\n".join(
        [
            "| fault | step | detected | back to training | steps repeated |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    rules = ", ".join(str(e.get("rule")) for e in taken)
    exact = "yes" if outcome == expected else "NO"
    finite = "yes" if outcome.get("finite") else "no"
    summary = "\n".join(
        [
            "| run | exit | wall | actions taken | final equals reference | final finite |",
            "|---|---|---|---|---|---|",
            f"| trainwarden | {code} | {wall:.1f}s | {len(taken)} ({rules}) | {exact} | {finite} |",
            f"| no faults (reference) | 0 | {reference_wall:.1f}s | 0 | - | {expected['finite']} |",
        ]
    )
    return per_fault, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=260)
    parser.add_argument("--step-sleep", type=float, default=0.03)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tw-heal-user-") as tmp:
        per_fault, summary = run(Path(tmp), args.steps, args.step_sleep)
    print(per_fault)
    print()
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
