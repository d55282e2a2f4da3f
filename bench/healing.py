"""Healing side by side in one run: trainwarden now vs today's path (an older tree) vs plain torchrun.

The 2-rank CPU toy job (`trainwarden.demo.toy_job`: torchrun, gloo, DDP, ~0.1 s a step of which
0.1 s is a sleep standing in for compute, a durable checkpoint every 10 steps) meets scripted
faults, each firing once: a loss spike (a batch x1000), a hung rank (sleeps forever), a crashed
rank (exit 1) and a NaN (the loss times NaN). The same faults run under:

- **trainwarden**: `run_job` of this tree's last commit (`--tree`, exported like `--ref`, so
  uncommitted edits never run) with the demo's config; the node-local checkpoint tier (under
  /dev/shm, every step, asynchronous) beside the durable one, and in-place rollback (the toy's
  `--rollback-every 5`: a NaN is rolled back in the same processes, no restart);
- **today**: `run_job` of an older tree (`--ref`, default the commit before issue 12's part 4),
  exported with `git archive` and put first on PYTHONPATH, its own toy job included;
- **torchrun**: plain `torchrun --max-restarts N` with a tuned collective timeout (`--pg-timeout`,
  gloo's default is 30 min); nothing in it notices a NaN or a spike;
- **no faults**: the same job under plain torchrun, the ceiling.

Measured from outside, on the toy's own step log (rank 0's `events.jsonl`, wall clock):

- per fault: *back* = the fault's own timestamp to the first step completed after it by the run
  that goes on (after a restart, the first step of the new run; without one, the next finite
  step); *repeated* = steps done before the fault that the run does again; *restart* = whether a
  new process group was started;
- per run: wall time (launch to exit), productive time (each step of the final lineage counted
  once, finite losses only, its own seconds; a batch skipped after a restart or a rollback is not
  in it), goodput = productive / wall, and its ratio to the
  no-fault run's; the daemon's own goodput ratio (its /status, last read before the job ended,
  where the tree has one) beside it;
- trainwarden's restarts stage by stage from `state_dir/restart_stages.jsonl`.

**Unabsorbed spike** (its own section, every run with `--clip none`: nothing absorbs the
gradient): a batch x`UNABSORBED_SCALE` (sign-flipped so the model gets it wrong: a x1000 batch it
gets right has a loss of 0 and no gradient) on alternating ranks, under trainwarden with the
Snapshotter's job-side spike check (`--spike-check`) and without it (rollback on, NaN only: the
daemon's spike rule then sees it, its route `clip` finds no clipper to tighten), and the no-fault
ceiling. Per spike: rolled back or not, *back* = the spike to the first step after the rollback,
*repeated* = steps trained again (the rollback's step minus the snapshot's, the skipped one not
counted); per run the mean loss of the last 20 steps (the damage a spike left) beside the
no-fault run's. A rollback counts this way for a NaN too.

`--quick` runs the four fault kinds once per path (a few minutes on an idle 2-core machine); the
full run adds a campaign with a fault every `--every` seconds of mixed kinds, and one of NaNs and
spikes only (trainwarden vs plain torchrun vs no faults)::

    .venv/bin/python bench/healing.py --quick
    .venv/bin/python bench/healing.py --unabsorbed-only                # the unabsorbed-spike section
    .venv/bin/python bench/healing.py --json /tmp/healing.json       # long: per kind + campaigns
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REF = "fa41cf3"  # the tree before the pidfd exit watcher, the stage journal and the fast kill
ROLLBACK_EVERY = 5  # trainwarden's snapshot interval: 0.67 % of the toy's step (bench/snapshot_cost.py)
STEP_SECONDS = 0.12  # the toy's step on this machine: 0.1 s sleep + compute, for spacing faults in time
UNABSORBED_SCALE = -1000.0
UNCLIPPED = ["--clip", "none", "--spike-scale", str(UNABSORBED_SCALE)]
SPIKE_CHECK = ["--spike-check"]
TAIL_STEPS = 20
RULES = {
    "hang": ("stall", "collective_stuck"),
    "crash": ("process_exit", "process_gone"),
    "nan": ("nonfinite",),
    "spike": ("spike",),
}


# --- the worker: one run of `run_job` in this interpreter (whichever tree PYTHONPATH gives) --------


def worker(args: argparse.Namespace) -> int:
    """Run the toy under `run_job` of the importable trainwarden; write what happened to `--out-json`."""
    from trainwarden.config import load_config  # noqa: PLC0415 - the tree under test, not this one
    from trainwarden.daemon.run_cli import run_job  # noqa: PLC0415
    from trainwarden.demo.runner import free_port  # noqa: PLC0415
    from trainwarden.demo.scenario import JOB, ScriptedFault, config_text, toy_command  # noqa: PLC0415
    from trainwarden.plugins import plugin_groups  # noqa: PLC0415

    root = Path(args.root)
    faults = [parse_fault(text, ScriptedFault) for text in args.fault]
    port = free_port()
    config_path = root / "config.toml"
    text = config_text(root, port, restarts_per_window=len(faults) + 2)
    if args.warm_start:
        section = "[healers.checkpoint_restart]\n"
        text = text.replace(section, section + "warm_start = true\nwarm_nice = 0\n")  # spares ready in time
    config_path.write_text(text, encoding="utf-8")
    config = load_config(config_path, plugin_groups())
    command = toy_command(root, args.steps, faults, free_port())
    if args.local_dir:
        command += ["--local-dir", args.local_dir, "--local-every", "1"]
    if args.rollback_every:
        command += ["--rollback-every", str(args.rollback_every)]
    command += args.toy_arg
    goodput: dict[str, Any] = {}
    done = threading.Event()
    poller = threading.Thread(target=poll_goodput, args=(f"http://127.0.0.1:{port}", JOB, goodput, done))
    poller.start()
    start = time.time()
    code = run_job(config, command, job=JOB)
    wall = time.time() - start
    done.set()
    poller.join(10)
    stages = root / "state" / "restart_stages.jsonl"
    result = {
        "exit_code": code,
        "start": start,
        "wall_s": wall,
        "events": read_jsonl(root / "events.jsonl"),
        "stages": read_jsonl(stages),
        "goodput": goodput.get("last"),
        "journal": journal_decisions(root / "state"),
    }
    Path(args.out_json).write_text(json.dumps(result), encoding="utf-8")
    return 0


def journal_decisions(state_dir: Path) -> list[list[str]]:
    """(healer, decision, result) of every journaled decision, in order ([] when there is no journal)."""
    path = state_dir / "journal.sqlite3"
    if not path.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            rows = db.execute("SELECT healer, decision, result FROM decisions ORDER BY id").fetchall()
    except sqlite3.Error:
        return []
    return [[str(v) for v in row] for row in rows]


def parse_fault(text: str, factory: Any) -> Any:
    """`KIND@STEP:RANK` into the demo's ScriptedFault (rules only name what may notice it)."""
    kind, _, rest = text.partition("@")
    step, _, rank = rest.partition(":")
    healers = ("clip",) if kind == "spike" else ("checkpoint_restart",)
    return factory(kind, int(step), int(rank or 0), RULES[kind], healers, kind)


def poll_goodput(url: str, job: str, out: dict[str, Any], done: threading.Event) -> None:
    """Keep the daemon's last goodput for `job` (trees without goodput accounting leave nothing)."""
    try:
        from trainwarden.goodput_report import fetch_goodput  # noqa: PLC0415 - absent in older trees
    except ImportError:
        return
    while not done.wait(1.0):
        try:
            found = fetch_goodput(url, job, timeout=2.0)
        except (OSError, ValueError):
            continue
        if found is not None:
            out["last"] = found


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of `path` (a line cut by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


# --- the runs ------------------------------------------------------------------------------------


@dataclass
class FaultResult:
    kind: str
    step: int
    fired: bool = False
    restart: bool = False
    back_s: float | None = None  # fault -> first step after it by the run that goes on
    repeated: int | None = None
    rolled_back: bool = False  # in place, by the job's Snapshotter, skipping the fault's batch


@dataclass
class RunResult:
    name: str
    exit_code: int
    wall_s: float
    productive_s: float
    final_step: int | None
    final_finite: bool
    daemon_goodput: float | None = None
    tail_loss: float | None = None  # mean loss of the final lineage's last TAIL_STEPS steps
    faults: list[FaultResult] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    journal: list[list[str]] = field(default_factory=list)  # (healer, decision, result) per decision

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0


def run_daemon(
    name: str,
    root: Path,
    steps: int,
    faults: list[str],
    *,
    src: Path,
    local_tier: bool,
    rollback_every: int = 0,
    warm_start: bool = False,
    toy_args: tuple[str, ...] = (),
) -> RunResult:
    """One `run_job` run in a worker of the tree exported at `src` (local tier, rollback: on or off)."""
    if (root / "result.json").exists():  # --keep of an earlier, interrupted bench: reuse its run
        data = json.loads((root / "result.json").read_text(encoding="utf-8"))
        return from_result(name, data, faults)
    root.mkdir(parents=True)
    env = dict(os.environ)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(root)]
    argv += ["--steps", str(steps), "--out-json", str(root / "result.json")]
    argv += [arg for fault in faults for arg in ("--fault", fault)]
    if rollback_every:
        argv += ["--rollback-every", str(rollback_every)]
    argv += ["--warm-start"] if warm_start else []
    argv += [f"--toy-arg={arg}" for arg in toy_args]
    env["PYTHONPATH"] = str(src)
    if local_tier:
        local = Path(
            tempfile.mkdtemp(prefix="tw-bench-local-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        )
        argv += ["--local-dir", str(local)]
    with (root / "job.log").open("wb") as log:
        subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=False, timeout=3600)
    if local_tier:
        shutil.rmtree(local, ignore_errors=True)
    return from_result(name, json.loads((root / "result.json").read_text(encoding="utf-8")), faults)


def from_result(name: str, data: dict[str, Any], faults: list[str]) -> RunResult:
    """A worker's result file, analysed."""
    ratio = (data.get("goodput") or {}).get("ratio")
    result = analyse(
        name,
        data["exit_code"],
        data["wall_s"],
        data["events"],
        faults,
        stages=data["stages"],
        daemon_goodput=float(ratio) if isinstance(ratio, int | float) else None,
    )
    result.journal = data.get("journal", [])
    return result


def run_torchrun(
    name: str,
    root: Path,
    steps: int,
    faults: list[str],
    pg_timeout: float,
    src: Path,
    toy_args: tuple[str, ...] = (),
) -> RunResult:
    """Plain `torchrun --max-restarts N` (or, without faults, the ceiling)."""
    if (root / "result.json").exists():  # --keep of an earlier, interrupted bench: reuse its run
        data = json.loads((root / "result.json").read_text(encoding="utf-8"))
        return analyse(name, data["exit_code"], data["wall_s"], data["events"], faults)
    root.mkdir(parents=True)
    from trainwarden.demo.runner import free_port  # noqa: PLC0415
    from trainwarden.demo.scenario import ScriptedFault, toy_command  # noqa: PLC0415

    cmd = toy_command(root, steps, [parse_fault(f, ScriptedFault) for f in faults], free_port())
    cmd[cmd.index("--max-restarts") + 1] = str(len(faults) + 2)
    cmd += ["--pg-timeout", str(pg_timeout), *toy_args]
    env = {**os.environ, "PYTHONPATH": str(src), "TRAINWARDEN_SOCKET": str(root / "no-daemon.sock")}
    env["TRAINWARDEN_CONTROL_DIR"] = str(root / "control")
    start = time.time()
    with (root / "job.log").open("wb") as log:
        code = subprocess.run(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False, timeout=3600
        ).returncode
    data = {"exit_code": code, "wall_s": time.time() - start, "events": read_jsonl(root / "events.jsonl")}
    (root / "result.json").write_text(json.dumps(data), encoding="utf-8")
    return analyse(name, data["exit_code"], data["wall_s"], data["events"], faults)


def analyse(
    name: str,
    code: int,
    wall: float,
    events: list[dict[str, Any]],
    faults: list[str],
    *,
    stages: list[dict[str, Any]] | None = None,
    daemon_goodput: float | None = None,
) -> RunResult:
    """The run's numbers from the toy's step log."""
    last: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == "step":
            last[int(e["step"])] = e
    # a batch the final lineage skipped (after a restart or a rollback) was never productive
    for e in events:
        if e.get("event") == "skip":
            last.pop(int(e["step"]), None)
        elif e.get("event") == "rollback":
            last.pop(int(e["skipped"]), None)
    productive = sum(float(e.get("seconds", 0.0)) for e in last.values() if finite(e.get("loss")))
    final = max(last) if last else None
    tail = [float(last[s]["loss"]) for s in sorted(last)[-TAIL_STEPS:] if finite(last[s].get("loss"))]
    result = RunResult(
        name,
        code,
        wall,
        productive,
        final,
        final is not None and finite(last[final].get("loss")),
        daemon_goodput,
        statistics.fmean(tail) if tail else None,
        stages=stages or [],
    )
    fired = sorted(
        ((float(e["time"]), str(e["kind"]), int(e["step"])) for e in events if e.get("event") == "fault"),
    )
    for text in faults:
        kind, _, rest = text.partition("@")
        step = int(rest.partition(":")[0])
        fault = FaultResult(kind, step)
        at = next((t for t, k, s in fired if (k, s) == (kind, step)), None)
        if at is not None:
            fault.fired = True
            later = [t for t, _k, _s in fired if t > at]
            measure(fault, at, min(later, default=math.inf), events)
        result.faults.append(fault)
    return result


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def measure(fault: FaultResult, at: float, until: float, events: list[dict[str, Any]]) -> None:
    """Back-to-training time and steps repeated of the fault at `at` (before the next one, `until`)."""
    timed = [e for e in events if "time" in e]
    steps = [e for e in timed if e.get("event") == "step"]
    rolled = next(
        (
            e
            for e in timed
            if e.get("event") == "rollback"
            and int(e["skipped"]) == fault.step
            and at < float(e["time"]) < until
        ),
        None,
    )
    if rolled is not None:  # in place: back at the first step after the rollback, in the same processes
        fault.rolled_back = True
        first = next((e for e in steps if float(e["time"]) > float(rolled["time"])), None)
        fault.back_s = None if first is None else float(first["time"]) - at
        fault.repeated = int(rolled["step"]) - int(rolled["to"])  # to..step again, less the skipped batch
        return
    start = next((e for e in timed if e.get("event") == "start" and at < float(e["time"]) < until), None)
    if start is not None:
        fault.restart = True
        began = float(start["time"])
        first = next((e for e in steps if float(e["time"]) > began), None)
        before = [int(e["step"]) for e in steps if float(e["time"]) < began]
        fault.back_s = None if first is None else float(first["time"]) - at
        fault.repeated = max(0, max(before, default=-1) - int(start.get("step", 0)) + 1)
        return
    first = next(
        (e for e in steps if float(e["time"]) > at and int(e["step"]) > fault.step and finite(e.get("loss"))),
        None,
    )
    if first is not None and float(first["time"]) < until:
        fault.back_s = float(first["time"]) - at
        fault.repeated = 0


# --- the report ----------------------------------------------------------------------------------


def per_kind_table(runs: list[RunResult]) -> str:
    lines = [
        "| fault | " + " | ".join(f"{r.name}: back / repeated / restart" for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    kinds = [(f.kind, f.step) for f in runs[0].faults] if runs else []
    for i, (kind, step) in enumerate(kinds):
        cells = []
        for run in runs:
            f = run.faults[i]
            if not f.fired:
                cells.append("did not fire")
            elif f.back_s is None:
                cells.append("never back" + (" (NaN parameters)" if kind == "nan" else ""))
            else:
                cells.append(f"{f.back_s:.1f} s / {f.repeated} / {'yes' if f.restart else 'no'}")
        lines.append(f"| {kind}@{step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unabsorbed_table(runs: list[RunResult], ceiling: RunResult) -> str:
    """Per spike: rolled back?, back, repeated, restart; per run: the loss its spikes left."""
    lines = [
        "| run | spikes rolled back | back (each) | repeated (each) | restart | max back |"
        f" mean loss, last {TAIL_STEPS} steps (no faults: "
        + ("-" if ceiling.tail_loss is None else f"{ceiling.tail_loss:.3f}")
        + ") |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        done = [f for f in run.faults if f.rolled_back]
        backs = [f.back_s for f in done if f.back_s is not None]
        lines.append(
            f"| {run.name} | {len(done)}/{len(run.faults)} "
            f"| {', '.join(f'{b:.2f} s' for b in backs) or '-'} "
            f"| {', '.join(str(f.repeated) for f in done) or '-'} "
            f"| {'yes' if any(f.restart for f in run.faults) else 'no'} "
            f"| {f'{max(backs):.2f} s' if backs else '-'} "
            f"| {'-' if run.tail_loss is None else f'{run.tail_loss:.3f}'} |"
        )
    lines.append("")
    for run in runs:
        counts = collections.Counter("/".join(entry) for entry in run.journal)
        told = ", ".join(f"{n} x {what}" for what, n in sorted(counts.items())) or "nothing"
        lines.append(f"- {run.name}, the daemon's journal (healer/decision/result): {told}")
    return "\n".join(lines)


def unabsorbed(tmp: Path, src: Path, pg_timeout: float) -> list[RunResult]:
    """The unabsorbed-spike section: with the job-side check, without it, and no faults (all unclipped)."""
    faults = spaced(["spike"] * 4, 60, 57)  # 57: mid-interval, two steps before a boundary
    steps = 57 + 3 * 60 + 20
    return [
        run_daemon(
            "trainwarden, job-side spike check",
            tmp / "unabsorbed-check",
            steps,
            faults,
            src=src,
            local_tier=True,
            rollback_every=ROLLBACK_EVERY,
            toy_args=(*UNCLIPPED, *SPIKE_CHECK),
        ),
        run_daemon(
            "trainwarden, rollback without the check",
            tmp / "unabsorbed-nocheck",
            steps,
            faults,
            src=src,
            local_tier=True,
            rollback_every=ROLLBACK_EVERY,
            toy_args=tuple(UNCLIPPED),
        ),
        run_torchrun("no faults", tmp / "unabsorbed-clean", steps, [], pg_timeout, src, tuple(UNCLIPPED)),
    ]


def steps_rate(run: RunResult, ceiling: RunResult) -> float:
    """Steps finished per wall second against the no-fault run's: goodput that slower steps cannot inflate.

    Goodput counts productive *step time*, so a run whose every step is slower (its own per-step cost)
    reads higher than it is; the step rate charges that cost too.
    """
    if run.final_step is None or ceiling.final_step is None or run.wall_s <= 0 or ceiling.wall_s <= 0:
        return 0.0
    return ((run.final_step + 1) / run.wall_s) / ((ceiling.final_step + 1) / ceiling.wall_s)


def runs_table(runs: list[RunResult], ceiling: RunResult | None) -> str:
    header = "| run | exit | wall | productive | goodput | vs no faults | steps/s vs no faults | daemon's"
    lines = [
        header + " | final step | finite |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        vs = "-" if ceiling is None or ceiling.goodput <= 0 else f"{run.goodput / ceiling.goodput:.2f}"
        rate = "-" if ceiling is None else f"{steps_rate(run, ceiling):.2f}"
        daemon = "-" if run.daemon_goodput is None else f"{run.daemon_goodput:.2f}"
        final = "-" if run.final_step is None else str(run.final_step + 1)
        lines.append(
            f"| {run.name} | {run.exit_code} | {run.wall_s:.1f} s | {run.productive_s:.1f} s | "
            f"{run.goodput:.2f} | {vs} | {rate} | {daemon} | {final} | "
            f"{'yes' if run.final_finite else 'no'} |"
        )
    return "\n".join(lines)


STAGE_ORDER = (
    "detect",
    "capture",
    "kill",
    "spawn",
    "process_start",
    "imports",
    "rendezvous",
    "checkpoint_load",
    "first_step",
)


def stages_table(run: RunResult) -> str:
    if not run.stages:
        return f"({run.name}: no restart measured stage by stage)"
    lines = [
        "| restart | cause | " + " | ".join(STAGE_ORDER) + " | total | repeated |",
        "|---|---|" + "---|" * (len(STAGE_ORDER) + 2),
    ]
    for entry in run.stages:
        stages = entry.get("stages", {})
        cells = [f"{stages[s]:.2f}" if s in stages else "-" for s in STAGE_ORDER]
        total = entry.get("total_seconds")
        lines.append(
            f"| {entry.get('restart')} | {entry.get('cause')} | "
            + " | ".join(cells)
            + f" | {'-' if total is None else f'{total:.2f}'} | {entry.get('steps_repeated')} |"
        )
    medians = [
        statistics.median(e["stages"][s] for e in run.stages if s in e.get("stages", {}))
        if any(s in e.get("stages", {}) for e in run.stages)
        else None
        for s in STAGE_ORDER
    ]
    lines.append("| median | | " + " | ".join("-" if m is None else f"{m:.2f}" for m in medians) + " | | |")
    return "\n".join(lines)


def export_ref(ref: str, into: Path) -> Path:
    """`ref`'s src/ exported (git archive) under `into`; its path, for PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "src"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def spaced(kinds: list[str], every_steps: int, first: int) -> list[str]:
    """Faults of `kinds` in turn, one every `every_steps` steps from `first`, alternating ranks."""
    return [f"{kind}@{first + i * every_steps}:{i % 2}" for i, kind in enumerate(kinds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each fault kind once per path, no campaigns")
    parser.add_argument("--ref", default=DEFAULT_REF, help="the tree of 'today' (a git revision)")
    parser.add_argument("--tree", default="HEAD", help="the tree of trainwarden and the toy (committed)")
    parser.add_argument("--pg-timeout", type=float, default=30.0, help="plain torchrun's collective timeout")
    parser.add_argument("--every", type=float, default=30.0, help="campaign: seconds between faults")
    parser.add_argument("--campaign-faults", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' directories here")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fault", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out-json", help=argparse.SUPPRESS)
    parser.add_argument("--local-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rollback-every", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--toy-arg", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--unabsorbed-only", action="store_true", help="only the unabsorbed-spike section")
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="a warm-start trainwarden row per kind and in the mixed campaign",
    )
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sections: dict[str, list[RunResult]] = {}
    with tempfile.TemporaryDirectory(prefix="tw-bench-healing-") as scratch:
        tmp = args.keep or Path(scratch)
        src = export_ref(args.tree, tmp / "tree")
        sections["unabsorbed spike"] = unabsorbed(tmp, src, args.pg_timeout)
        if args.unabsorbed_only:
            report(sections, args.json)
            return 0
        ref_src = export_ref(args.ref, tmp / "ref")
        kinds_faults = spaced(["spike", "crash", "hang", "nan"], 60, 55)  # mid-way between checkpoints
        kinds_steps = 55 + 4 * 60 + 15
        per_kind = [
            run_daemon(
                "trainwarden",
                tmp / "kinds-trainwarden",
                kinds_steps,
                kinds_faults,
                src=src,
                local_tier=True,
                rollback_every=ROLLBACK_EVERY,
            ),
            run_daemon(
                f"today ({args.ref})",
                tmp / "kinds-today",
                kinds_steps,
                kinds_faults,
                src=ref_src,
                local_tier=False,
            ),
            run_torchrun("torchrun", tmp / "kinds-torchrun", kinds_steps, kinds_faults, args.pg_timeout, src),
            run_torchrun("no faults", tmp / "kinds-clean", kinds_steps, [], args.pg_timeout, src),
        ]
        if args.warm_start:
            warm = run_daemon(
                "trainwarden (warm start, warm_nice 0)",
                tmp / "kinds-warm",
                kinds_steps,
                kinds_faults,
                src=src,
                local_tier=True,
                rollback_every=ROLLBACK_EVERY,
                warm_start=True,
            )
            per_kind.insert(1, warm)
        sections["per fault kind"] = per_kind
        if not args.quick:
            every = max(1, round(args.every / STEP_SECONDS))
            mixed = ["crash", "nan", "hang", "spike"] * args.campaign_faults
            mixed = spaced(mixed[: args.campaign_faults], every, every)
            soft = spaced((["nan", "spike"] * args.campaign_faults)[: args.campaign_faults], every, every)
            steps = every * (args.campaign_faults + 1)
            sections["campaign, mixed"] = [
                run_daemon(
                    "trainwarden",
                    tmp / "mixed-trainwarden",
                    steps,
                    mixed,
                    src=src,
                    local_tier=True,
                    rollback_every=ROLLBACK_EVERY,
                ),
                run_torchrun("torchrun", tmp / "mixed-torchrun", steps, mixed, args.pg_timeout, src),
                run_torchrun("no faults", tmp / "mixed-clean", steps, [], args.pg_timeout, src),
            ]
            if args.warm_start:
                warm_mixed = run_daemon(
                    "trainwarden (warm start, warm_nice 0)",
                    tmp / "mixed-warm",
                    steps,
                    mixed,
                    src=src,
                    local_tier=True,
                    rollback_every=ROLLBACK_EVERY,
                    warm_start=True,
                )
                sections["campaign, mixed"].insert(1, warm_mixed)
            sections["campaign, NaN and spike only"] = [
                run_daemon(
                    "trainwarden",
                    tmp / "soft-trainwarden",
                    steps,
                    soft,
                    src=src,
                    local_tier=True,
                    rollback_every=ROLLBACK_EVERY,
                ),
                next(r for r in sections["campaign, mixed"] if r.name == "no faults"),
            ]
    report(sections, args.json)
    return 0


def report(sections: dict[str, list[RunResult]], json_path: Path | None) -> None:
    """Print every section's tables; write them as JSON where asked."""
    for title, runs in sections.items():
        ceiling = next((r for r in runs if r.name == "no faults"), None)
        print(f"\n### {title}\n")
        if title == "unabsorbed spike" and ceiling is not None:
            print(unabsorbed_table([r for r in runs if r.faults], ceiling))
            print()
        faulted = [r for r in runs if r.faults]
        if faulted and faulted[0].faults and len(faulted[0].faults) <= 8:
            print(per_kind_table(faulted))
            print()
        print(runs_table(runs, ceiling))
        for run in runs:
            if run.stages:
                print(f"\n{run.name}, restarts stage by stage (seconds):\n")
                print(stages_table(run))
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {k: [{**asdict(r), "goodput": r.goodput} for r in v] for k, v in sections.items()}, indent=2
            ),
            encoding="utf-8",
        )


if __name__ == "__main__":
    sys.exit(main())
