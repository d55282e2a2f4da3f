"""Running the framework integration jobs (tests/integration_*_job.py) with and without the daemon."""

from __future__ import annotations

from pathlib import Path

from heal_support import TRAINWARDEN, Run, config_text
from integration_data import read_final, write_data
from toy_launch import Proc, torchrun_command, toy_env

TESTS = Path(__file__).resolve().parent
JOBS = {"lightning": TESTS / "integration_lightning_job.py", "transformers": TESTS / "integration_hf_job.py"}
JOB = "integration"


def job_env(tmp: Path) -> dict[str, str]:
    """The toy environment, with tests/ on the path so the jobs find `integration_data`."""
    env = toy_env(tmp)
    env["PYTHONPATH"] = str(TESTS) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("RANK", None)
    return env


def job_args(framework: str, data: Path, steps: int, ckpt: Path, out: Path, *extra: str) -> list[str]:
    """The job's command line (after torchrun's own arguments)."""
    return [
        str(JOBS[framework]),
        "--data",
        str(data),
        "--steps",
        str(steps),
        "--ckpt-dir",
        str(ckpt),
        "--out",
        str(out),
        *extra,
    ]


def make_data(tmp: Path, batches: int = 100) -> Path:
    """The data file both ranks read from."""
    return write_data(tmp / "data", batches)


def reference(framework: str, tmp: Path, data: Path, steps: int) -> dict[str, object]:
    """An uninterrupted 2-rank run without the daemon: the final parameters every healed run must reach."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = Proc(torchrun_command(job_args(framework, data, steps, tmp / "ckpt", tmp / "out")), job_env(tmp))
    code = proc.wait(400)
    assert code == 0, proc.output()
    return read_final(tmp / "out")


def supervised(framework: str, tmp: Path, data: Path, steps: int, *extra: str) -> Run:
    """`trainwarden run --job integration` (actions on, default rules) around torchrun and the job."""
    config = tmp / "config.toml"
    config.write_text(config_text(tmp), encoding="utf-8")
    env = job_env(tmp)
    for name in ("TRAINWARDEN_SOCKET", "TRAINWARDEN_CONTROL_DIR"):
        env.pop(name)  # `trainwarden run` sets them for its child
    args = job_args(framework, data, steps, tmp / "ckpt", tmp / "out", *extra)
    cmd = [*TRAINWARDEN, "run", "--config", str(config), "--job", JOB, "--", *torchrun_command(args)]
    return Run(Proc(cmd, env), tmp)


def script_name(framework: str) -> str:
    """What `Run.rank_pid(script=...)` looks for in a worker's command line."""
    return JOBS[framework].stem


__all__ = ["JOB", "make_data", "read_final", "reference", "script_name", "supervised"]
