"""What the demo runs: the daemon's config, the toy job's command line and its scripted faults.

The config is the product's own TOML, written into the demo's directory so a newcomer can read
(and copy) what made each decision: actions enabled explicitly, learned-timeout floors and
cooldowns small enough that a job stepping every ~0.1 s is diagnosed in seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

JOB = "demo"
STEP_SLEEP_SECONDS = 0.1
CKPT_EVERY = 10
MIN_STEPS = 160
SPIKE_STEP = 45


@dataclass(frozen=True)
class ScriptedFault:
    """One fault the toy injects, and what must notice and mend it."""

    kind: str
    step: int
    rank: int
    rules: tuple[str, ...]
    healers: tuple[str, ...]
    what: str

    @property
    def restarts(self) -> bool:
        """True when healing this fault restarts the job."""
        return "checkpoint_restart" in self.healers

    def flag(self) -> str:
        """The toy's `--fault` value."""
        return f"{self.kind}@{self.step}:{self.rank}"


def scripted_faults(steps: int) -> list[ScriptedFault]:
    """A loss spike, a hung rank, a crashed rank and a NaN burst, spread over the run.

    The spike comes at step 45, once the clipper's warm-up (10 steps) is over and the spike rule
    has its baseline (30 points); the others are spread over the rest of the run, mid-way between
    two checkpoints, so each is healed before the next one starts.
    """
    if steps < MIN_STEPS:
        raise ValueError(f"the demo needs --steps >= {MIN_STEPS} to fit its four faults, got {steps}")

    def at(fraction: float) -> int:
        return round(steps * fraction) // CKPT_EVERY * CKPT_EVERY + CKPT_EVERY // 2

    restart = ("checkpoint_restart",)
    return [
        ScriptedFault("spike", SPIKE_STEP, 0, ("spike",), ("clip",), "loss spike (a batch scaled 1000x)"),
        ScriptedFault(
            "hang", at(0.4), 1, ("stall", "collective_stuck"), restart, "hung rank (sleeps forever)"
        ),
        ScriptedFault(
            "crash", at(0.6), 0, ("process_exit", "process_gone"), restart, "crashed rank (exit status 1)"
        ),
        ScriptedFault("nan", at(0.8), 1, ("nonfinite",), restart, "NaN burst (loss times NaN)"),
    ]


def toy_command(
    root: Path, steps: int, faults: Sequence[ScriptedFault], master_port: int, python: str = sys.executable
) -> list[str]:
    """The command: torchrun, two gloo ranks of the packaged toy job; faults fire once (markers in `root`)."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.2",
        "-m",
        "trainwarden.demo.toy_job",
        "--job",
        JOB,
        "--steps",
        str(steps),
        "--step-sleep",
        str(STEP_SLEEP_SECONDS),
        "--ckpt-dir",
        str(root / "checkpoints"),
        "--ckpt-every",
        str(CKPT_EVERY),
        "--fault-once",
        str(root / "faults"),
        "--events",
        str(root / "events.jsonl"),
        "--out",
        str(root / "out"),
        *[arg for fault in faults for arg in ("--fault", fault.flag())],
    ]


def config_text(root: Path, port: int, *, restarts_per_window: int = 4) -> str:
    """The daemon config of the demo (TOML), every value that differs from the defaults explained.

    `restarts_per_window` bounds the restarts in one 10-minute budget window before the policy
    gives up and alerts (bench/healing.py's campaign has more faults than the demo).
    """
    return f"""\
# trainwarden demo configuration: the defaults, with actions enabled and timings shrunk so a toy
# job that steps every ~0.1 s is diagnosed and healed in seconds.

[daemon]
listen = "127.0.0.1:{port}"
runtime_dir = "{root / "run"}"
state_dir = "{root / "state"}"
log_level = "warning"
window_seconds = 300.0

[collectors.training]
# Step records arrive continuously; turn them into series twice a second.
interval_seconds = 0.5

# Nothing to see on a CPU-only laptop.
[collectors.gpu]
enabled = false
[collectors.kmsg]
enabled = false
[collectors.xid]
enabled = false
[collectors.infiniband]
enabled = false

[rules.stall]
# Learned: 99th percentile of the job's own step times x 4, at least 3 s (default 20 s).
floor_seconds = 3.0
resolve_after_seconds = 3.0
min_samples = 10
default_timeout_seconds = 30.0

# Findings resolve within seconds once their cause is gone (defaults: 30-60 s), so a finding the
# policy already acted on has resolved before the cooldown below ends and is not acted on again.
[rules.spike]
recent_seconds = 3.0
# The spike comes at step 45: the demo pins the warm-up it was scripted for, whatever the default.
min_baseline_points = 30
resolve_after_seconds = 3.0

[rules.nonfinite]
recent_seconds = 2.0
resolve_after_seconds = 2.0

[rules.process_gone]
resolve_after_seconds = 3.0

# A restart makes the job slower for a while and shuffles step times; not what the demo is about.
[rules.straggler]
enabled = false
[rules.throughput_drop]
enabled = false

[policy]
# Observe-only is the default; the demo heals.
actions_enabled = true
# Between two actions on one job (default 120 s): longer than the findings above take to
# resolve, shorter than the gap between the demo's faults.
cooldown_seconds = 8.0
budget_window_seconds = 600.0
# The demo's three restarts (hang, crash, NaN) walk one ladder; allow them (default 2 per hour).
attempts_per_rung = {restarts_per_window}

# Clipping changes the training, so by default a spike is only observed; the demo opts in.
[policy.routes]
spike = ["clip", "checkpoint_restart"]

[healers.checkpoint_restart]
backend = "supervise"
checkpoint_timeout_seconds = 15.0
stack_timeout_seconds = 5.0
kill_grace_seconds = 5.0
# Skip the first bad step and the one after it on resume.
skip_batches_after = 1
"""
