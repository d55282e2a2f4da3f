"""Running `tests/user_trainer.py` (a trainer written from the docs alone) with and without the daemon."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from heal_support import TRAINWARDEN, Run, config_text
from toy_launch import Proc, torchrun_command, toy_env
from trainwarden.client.identity import DEFAULT_JOB
from trainwarden.control import ControlState, control_path, write_control
from user_trainer import write_data

TRAINER = Path(__file__).resolve().parent / "user_trainer.py"


def trainer_args(data: Path, steps: int, *extra: str, ckpt: Path | None = None, out: Path) -> list[str]:
    """The trainer's command line (after torchrun's own arguments)."""
    args = [str(TRAINER), "--data", str(data), "--steps", str(steps), "--out", str(out), *extra]
    if ckpt is not None:
        args += ["--ckpt-dir", str(ckpt)]
    return args


def make_data(tmp: Path, steps: int, poison: dict[int, tuple[str, int]] | None = None, seed: int = 0) -> Path:
    """The data file, with the given batches poisoned ("nan" / "spike" on one rank's slice)."""
    path = tmp / "data"
    write_data(path, steps, 2, seed, poison or {})
    return path


def final(out: Path) -> dict[str, object]:
    """The trainer's final.json: digest and whether every parameter is finite."""
    result: dict[str, object] = json.loads((out / "final.json").read_text(encoding="utf-8"))
    return result


def reference(
    tmp: Path, data: Path, steps: int, *extra: str, skip: tuple[int, ...] = ()
) -> dict[str, object]:
    """An uninterrupted run with no daemon that skips exactly `skip` (through the documented control file)."""
    env = toy_env(tmp)
    if skip:
        state = ControlState(job=DEFAULT_JOB, skip_batches=tuple((s, s) for s in skip))
        write_control(control_path(Path(env["TRAINWARDEN_CONTROL_DIR"]), DEFAULT_JOB), state)
    proc = Proc(torchrun_command(trainer_args(data, steps, *extra, out=tmp / "out")), env)
    code = proc.wait(240)
    assert code == 0, proc.output()
    return final(tmp / "out")


def supervised(tmp: Path, args: list[str], *, extra_config: str = "", job: str | None = None) -> Run:
    """`trainwarden run` (actions on, default rules and routes) around torchrun and the trainer."""
    config = tmp / "config.toml"
    config.write_text(config_text(tmp, extra=extra_config), encoding="utf-8")
    env = toy_env(tmp)
    for name in ("TRAINWARDEN_SOCKET", "TRAINWARDEN_CONTROL_DIR"):
        env.pop(name)  # `trainwarden run` sets them for its child
    cmd = [*TRAINWARDEN, "run", "--config", str(config)]
    if job is not None:
        cmd += ["--job", job]
    return Run(Proc([*cmd, "--", *torchrun_command(args)], env), tmp)


def findings(state: Path) -> list[dict[str, object]]:
    """Every finding the daemon logged (`findings.jsonl` in the state directory)."""
    path = state / "findings.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def skipped(run: Run) -> list[int]:
    """Batches the trainer reported skipping, in order, across restarts."""
    return [int(m.group(1)) for line in run.proc.lines if (m := re.match(r"SKIP (\d+)$", line))]


def metrics_by_rank(text: str, name: str) -> dict[str, float]:
    """rank -> value of one per-rank training series in an exposition."""
    return {
        sample.labels["rank"]: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and "rank" in sample.labels
    }
