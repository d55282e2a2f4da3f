"""Who this training process is, read from the launcher's environment.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and TORCHELASTIC_RESTART_COUNT; Slurm sets
SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_ID and SLURM_RESTART_COUNT (on requeue).
The job name comes from an explicit argument, then TRAINWARDEN_JOB, then the Slurm job id,
then torchrun's run id; it is made safe for a control file name and a metric label.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from trainwarden.protocol import DEFAULT_JOB, JOB_ENV, safe_job_name

# The job-name rules are the daemon's too (`trainwarden run` names the job), so they live in the
# wire protocol; re-exported here, where the client has always found them.
__all__ = [
    "DEFAULT_JOB",
    "JOB_ENV",
    "RESTART_COUNT_VARIABLES",
    "Identity",
    "identity_from_env",
    "restart_count_from_env",
    "safe_job_name",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """The rank's place in its job, as sent in the hello record."""

    job: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0
    slurm_job_id: str = ""
    pid: int = 0

    def hello(self, version: int) -> dict[str, object]:
        """The hello record announcing this identity."""
        return {
            "type": "hello",
            "v": version,
            "job": self.job,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "pid": os.getpid(),  # after a fork the child is another process
            "restart_count": self.restart_count,
        }


def _int(env: Mapping[str, str], *names: str, default: int = 0) -> int:
    """First of `names` that is a non-negative integer; a garbled value is skipped, never fatal."""
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


RESTART_COUNT_VARIABLES = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", "TRAINWARDEN_RESTART_COUNT")


def restart_count_from_env(env: Mapping[str, str] | None = None) -> int:
    """How often the job was restarted: the most any launcher says.

    Launchers nest (`trainwarden run` restarting torchrun, whose agent restarts its workers), and
    each counts only its own restarts, so the largest count is the one that is never behind.
    """
    env = os.environ if env is None else env
    return max(_int(env, name) for name in RESTART_COUNT_VARIABLES)


def identity_from_env(job: str | None = None, env: Mapping[str, str] | None = None) -> Identity:
    """Read the identity; a missing or garbled variable falls back to a single-process default."""
    env = os.environ if env is None else env
    slurm_job = env.get("SLURM_JOB_ID", "").strip()
    run_id = env.get("TORCHELASTIC_RUN_ID", "").strip()
    name = job or env.get(JOB_ENV, "").strip()
    if not name and slurm_job:
        name = f"slurm-{slurm_job}"
    if not name and run_id and run_id != "none":
        name = run_id
    world_size = max(1, _int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1))
    rank = _int(env, "RANK", "SLURM_PROCID")
    if rank >= world_size:  # an inconsistent environment: trust the rank, widen the world
        world_size = rank + 1
    return Identity(
        job=safe_job_name(name or DEFAULT_JOB),
        rank=rank,
        local_rank=_int(env, "LOCAL_RANK", "SLURM_LOCALID"),
        world_size=world_size,
        restart_count=restart_count_from_env(env),
        slurm_job_id=slurm_job,
        pid=os.getpid(),
    )
