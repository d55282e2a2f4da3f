"""Drain (or undrain) a node by running the operator's own command, e.g. a site script or a CMDB call.

The commands are argument lists from the config with `{node}`, `{reason}`, `{job}` and `{job_id}`
placeholders, filled only with validated values (see `trainwarden.commands`); nothing goes through
a shell. An optional `check_argv` asks whether the node is already drained (exit 0 = drained), so
repeated actions are no-ops; without it, idempotence is the command's own job.

    [healers.command_drain]
    enabled = true
    drain_argv = ["/usr/local/sbin/drain-node", "--node", "{node}", "--reason", "trainwarden: {reason}"]
    undrain_argv = ["/usr/local/sbin/undrain-node", "{node}"]
    check_argv = ["/usr/local/sbin/is-drained", "{node}"]
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from trainwarden.commands import (
    CommandError,
    CommandResult,
    CommandRunner,
    CommandTemplate,
    RunStatus,
)
from trainwarden.config import PluginOptions
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.model import Sample


@dataclass(frozen=True)
class CommandDrainOptions(PluginOptions):
    """The argument lists to run; templates are checked when the config loads."""

    enabled: bool = False  # draining takes capacity away: only when the config asks for it

    drain_argv: tuple[str, ...] = ()
    undrain_argv: tuple[str, ...] = ()
    check_argv: tuple[str, ...] = ()  # exit 0: already drained; 1: not drained; other: error
    timeout_seconds: float = 60.0
    node: str = ""  # default: this host's short name

    def problems(self) -> list[tuple[str, str]]:
        """Every configured template must parse and use only known placeholders."""
        found = super().problems()
        if self.enabled and not self.drain_argv:
            found.append(("drain_argv", "required when the healer is enabled"))
        for key in ("drain_argv", "undrain_argv", "check_argv"):
            argv = getattr(self, key)
            if argv:
                try:
                    CommandTemplate(argv)
                except CommandError as exc:
                    found.append((key, str(exc)))
        if self.timeout_seconds <= 0:
            found.append(("timeout_seconds", "must be > 0"))
        return found


def _result(what: str, run: CommandResult, data: dict[str, str | float | int | bool]) -> ActionResult:
    if run.status is RunStatus.REFUSED:
        return ActionResult(ActionOutcome.FAILED, f"refused: {run.error}", {**data, "refused": "bad_input"})
    if not run.ok:
        return ActionResult(ActionOutcome.FAILED, f"{what} failed: {run.summary()}", data)
    return ActionResult(ActionOutcome.APPLIED, f"{what}: {run.summary()}", data)


class CommandDrainHealer(Healer):
    """Run the configured drain/undrain command for a node."""

    name = "command_drain"
    Options = CommandDrainOptions

    def __init__(self, options: PluginOptions, context: HealerContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, CommandDrainOptions)
        self.opts = options
        self.runner = CommandRunner()
        self.drain_cmd = CommandTemplate(options.drain_argv) if options.drain_argv else None
        self.undrain_cmd = CommandTemplate(options.undrain_argv) if options.undrain_argv else None
        self.check_cmd = CommandTemplate(options.check_argv) if options.check_argv else None

    def samples(self) -> list[Sample]:
        """`trainwarden_command_runs_total{program,result}` for the exporter."""
        return self.runner.samples()

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:  # noqa: PLR0911 - one return per check
        """Run the drain or undrain command (only its check when `dry_run`); never raises."""
        operation = str(action.params.get("operation", "drain"))
        template = {"drain": self.drain_cmd, "undrain": self.undrain_cmd}.get(operation)
        if template is None:
            why = f"refused: no command configured for operation {operation[:40]!r}"
            return ActionResult(ActionOutcome.FAILED, why, {"refused": "bad_input"})
        node = action.subject.get("node") or str(action.params.get("node", "")) or self.opts.node
        values = {
            "node": node or socket.gethostname().split(".")[0],
            "reason": action.reason or "unhealthy",
            "job": action.subject.get("job", ""),
            "job_id": str(action.params.get("job_id", action.subject.get("job_id", ""))),
        }
        data: dict[str, str | float | int | bool] = {"node": values["node"][:80], "operation": operation}
        try:
            argv = template.render(values)
        except CommandError as exc:
            self.runner.refused(template.argv[0], str(exc))
            return ActionResult(ActionOutcome.FAILED, f"refused: {exc}", {**data, "refused": "bad_input"})
        if self.check_cmd is not None:
            check = self.runner.run_template(self.check_cmd, values, self.opts.timeout_seconds)
            if check.status is RunStatus.OK and operation == "drain":
                return ActionResult(ActionOutcome.NOOP, f"node {values['node']} already drained", data)
            if check.status is RunStatus.FAILED and check.returncode == 1 and operation == "undrain":
                return ActionResult(ActionOutcome.NOOP, f"node {values['node']} is not drained", data)
            if check.status not in (RunStatus.OK, RunStatus.FAILED) or check.returncode not in (0, 1):
                return ActionResult(ActionOutcome.FAILED, f"check failed: {check.summary()}", data)
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would run {argv!r}", data)
        return _result(
            f"{operation} {values['node']}", self.runner.run(argv, self.opts.timeout_seconds), data
        )


HEALER = CommandDrainHealer
