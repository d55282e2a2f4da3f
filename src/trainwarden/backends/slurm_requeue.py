"""The `slurm` restart backend: `scontrol requeue` of the job's Slurm batch job (see `slurm.requeue_job`)."""

from __future__ import annotations

import re

from trainwarden.backends.base import RestartBackend
from trainwarden.backends.slurm import Scontrol, requeue_job
from trainwarden.model import ActionOutcome, ActionResult, Sample

_SLURM_JOB = re.compile(r"^slurm-(\d+)$")


def slurm_job_id(job: str, configured: str = "") -> str:
    """The Slurm job id: configured, else from a job named `slurm-<id>` (the client's default name)."""
    if configured:
        return configured
    match = _SLURM_JOB.match(job)
    return match.group(1) if match else ""


class SlurmRequeueBackend(RestartBackend):
    """Requeues the batch job; Slurm starts it again and it resumes from its checkpoint."""

    name = "slurm"

    def __init__(self, scontrol: Scontrol | None = None, job_id: str = "", *, start_now: bool = True) -> None:
        super().__init__()
        self.scontrol = scontrol or Scontrol()
        self.job_id = job_id
        self.start_now = start_now

    def _restart(self, job: str, reason: str, *, dry_run: bool) -> ActionResult:
        del reason
        job_id = slurm_job_id(job, self.job_id)
        if not job_id:
            why = f"no Slurm job id for job {job!r} (set job_id, or name the job slurm-<id>)"
            return ActionResult(ActionOutcome.FAILED, why)
        return requeue_job(self.scontrol, job_id, dry_run=dry_run, start_now=self.start_now)

    def samples(self) -> list[Sample]:
        """Runs of scontrol, by result."""
        return self.scontrol.runner.samples()
