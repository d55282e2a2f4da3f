"""The `command` backend: the operator's own restart command, as an argument list with placeholders.

`{job}` and `{reason}` are filled with validated, sanitised values (`trainwarden.commands`), each
staying one argument; nothing goes through a shell, so no finding text can inject anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainwarden.backends.base import RestartBackend
from trainwarden.commands import CommandRunner, CommandTemplate
from trainwarden.model import ActionOutcome, ActionResult, Sample


class CommandBackend(RestartBackend):
    """Runs `argv` (checked when built) and reports its exit as the restart's result."""

    name = "command"

    def __init__(
        self, argv: Sequence[str], runner: CommandRunner | None = None, timeout: float = 120.0
    ) -> None:
        super().__init__()
        self.template = CommandTemplate(tuple(argv))
        self.runner = runner or CommandRunner()
        self.timeout = timeout

    def _restart(self, job: str, reason: str, *, dry_run: bool) -> ActionResult:
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would run {self.template.argv[0]} for job {job}")
        result = self.runner.run_template(self.template, {"job": job, "reason": reason}, self.timeout)
        if not result.ok:
            return ActionResult(ActionOutcome.FAILED, result.summary())
        return ActionResult(ActionOutcome.APPLIED, f"{self.template.argv[0]} restarted job {job}")

    def samples(self) -> list[Sample]:
        """Commands run, by program and result."""
        return self.runner.samples()
