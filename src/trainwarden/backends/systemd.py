"""The `systemd` backend: `systemctl restart UNIT` for a job that runs as a unit of its own."""

from __future__ import annotations

import re

from trainwarden.backends.base import RestartBackend
from trainwarden.commands import CommandRunner
from trainwarden.model import ActionOutcome, ActionResult, Sample

UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,255}\.(service|scope|target)$")


class SystemdBackend(RestartBackend):
    """Restarts one configured unit through the safe command runner (argument list, timeout)."""

    name = "systemd"

    def __init__(
        self,
        unit: str,
        runner: CommandRunner | None = None,
        program: str = "systemctl",
        timeout: float = 120.0,
    ) -> None:
        super().__init__()
        if not UNIT_NAME.match(unit) or unit.startswith("-"):
            raise ValueError(f"systemd unit {unit!r} must be a unit name such as train.service")
        self.unit = unit
        self.runner = runner or CommandRunner()
        self.program = program
        self.timeout = timeout

    def _restart(self, job: str, reason: str, *, dry_run: bool) -> ActionResult:
        argv = [self.program, "restart", self.unit]
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would run {' '.join(argv)} for job {job} ({reason})")
        result = self.runner.run(argv, self.timeout)
        if not result.ok:
            return ActionResult(ActionOutcome.FAILED, result.summary())
        return ActionResult(ActionOutcome.APPLIED, f"restarted unit {self.unit} for job {job}")

    def samples(self) -> list[Sample]:
        """Commands run, by program and result."""
        return self.runner.samples()
