"""Drain (or undrain) a Slurm node through `scontrol`, within a cluster-wide budget.

Drain sets `State=DRAIN Reason="trainwarden: <reason>"`: running jobs finish, nothing new starts.
State is read first, so draining twice is a no-op, a node an admin drained is left alone (its
reason is theirs), and only nodes whose reason carries the `trainwarden:` prefix are ever resumed.
The budget counts nodes drained by trainwarden across the whole cluster from `scontrol show nodes`,
so one bad rule cannot empty a partition.

Action: `subject["node"]` (or `params["node"]`, else `options.node`, else this host's short name);
`params["operation"]` is `drain` (default) or `undrain`. The budget is checked just before acting,
so daemons on several nodes draining in the same instant can overshoot it by the number racing.

    [healers.slurm_drain]
    enabled = true
    max_drained_nodes = 2          # across the cluster, counted from `scontrol show nodes`
    # slurm_conf = "/etc/slurm/slurm.conf"   # exported as SLURM_CONF for scontrol
    # node = "gpu-07"                         # when the NodeName is not the short hostname
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from trainwarden.backends.slurm import REASON_PREFIX, Scontrol, SlurmError, SlurmNode
from trainwarden.commands import NODE_NAME, CommandRunner, sanitize_reason
from trainwarden.config import PluginOptions
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.model import Sample


@dataclass(frozen=True)
class SlurmDrainOptions(PluginOptions):
    """Where `scontrol` is and how many nodes trainwarden may hold drained at once."""

    enabled: bool = False  # draining takes capacity away: only when the config asks for it

    scontrol: str = "scontrol"
    slurm_conf: str = ""  # exported as SLURM_CONF for scontrol when set
    timeout_seconds: float = 15.0
    max_drained_nodes: int = 1
    node: str = ""  # this node's Slurm NodeName when it is not the short hostname

    def problems(self) -> list[tuple[str, str]]:
        """Positive timeout, non-negative budget, a valid node name."""
        found = super().problems()
        if self.timeout_seconds <= 0:
            found.append(("timeout_seconds", "must be > 0"))
        if self.max_drained_nodes < 0:
            found.append(("max_drained_nodes", "must be >= 0"))
        if self.node and not NODE_NAME.match(self.node):
            found.append(("node", f"must match {NODE_NAME.pattern}"))
        if not self.scontrol:
            found.append(("scontrol", "must name the scontrol program"))
        return found


def _describe(node: SlurmNode) -> str:
    state = "+".join([node.state, *sorted(node.flags)])
    reason = f", reason {node.reason!r}" if node.reason else ""
    return f"{state}{reason}"


class SlurmDrainHealer(Healer):
    """Drain or undrain one Slurm node, checked before and after."""

    name = "slurm_drain"
    Options = SlurmDrainOptions

    def __init__(self, options: PluginOptions, context: HealerContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, SlurmDrainOptions)
        self.opts = options
        env = {"SLURM_CONF": options.slurm_conf} if options.slurm_conf else {}
        self.runner = CommandRunner(env=env)
        self.scontrol = Scontrol(self.runner, options.scontrol, options.timeout_seconds)

    def samples(self) -> list[Sample]:
        """Counts of the scontrol runs this healer made, for the exporter."""
        return self.runner.samples()

    def target(self, action: Action) -> str:
        """The node an action is about."""
        node = action.subject.get("node") or str(action.params.get("node", "")) or self.opts.node
        return node or socket.gethostname().split(".")[0]

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:
        """Drain or undrain the action's node; never raises."""
        node = self.target(action)
        operation = str(action.params.get("operation", "drain"))
        try:
            if not NODE_NAME.match(node):
                self.runner.refused(self.opts.scontrol, f"bad node name {node[:80]!r}")
                why = f"refused: node name {node[:80]!r} must match {NODE_NAME.pattern}"
                return ActionResult(ActionOutcome.FAILED, why, {"refused": "bad_input"})
            if operation == "drain":
                return self._drain(node, action.reason, dry_run=dry_run)
            if operation == "undrain":
                return self._undrain(node, dry_run=dry_run)
        except SlurmError as exc:
            return ActionResult(ActionOutcome.FAILED, str(exc), {"node": node})
        why = f"refused: params.operation {operation[:40]!r} must be 'drain' or 'undrain'"
        return ActionResult(ActionOutcome.FAILED, why, {"refused": "bad_input"})

    def _drain(self, node: str, reason: str, *, dry_run: bool) -> ActionResult:  # noqa: PLR0911 - one return per state
        current = self.scontrol.node(node)
        if current is None:
            return ActionResult(ActionOutcome.FAILED, f"node {node} is unknown to Slurm", {"node": node})
        if current.drained_by_trainwarden:
            return ActionResult(
                ActionOutcome.NOOP, f"node {node} already drained by trainwarden", {"node": node}
            )
        if current.drained:
            detail = f"node {node} already drained by someone else ({_describe(current)}); left alone"
            return ActionResult(ActionOutcome.NOOP, detail, {"node": node, "foreign": True})
        ours = sorted(n.name for n in self.scontrol.nodes() if n.drained_by_trainwarden and n.name != node)
        if len(ours) >= self.opts.max_drained_nodes:
            listed = ", ".join(ours[:10]) or "none"
            detail = (
                f"refused: budget of {self.opts.max_drained_nodes} drained node(s) reached "
                f"({len(ours)} drained by trainwarden: {listed}); {node} not drained"
            )
            return ActionResult(ActionOutcome.FAILED, detail, {"node": node, "refused": "budget"})
        text = sanitize_reason(f"{REASON_PREFIX} {reason or 'unhealthy'}")
        if dry_run:
            detail = f"would drain {node} ({_describe(current)}) with reason {text!r}"
            return ActionResult(ActionOutcome.DRY_RUN, detail, {"node": node})
        self.scontrol.drain(node, text)
        after = self.scontrol.node(node)
        if after is None or not after.drained_by_trainwarden:
            seen = "gone" if after is None else _describe(after)
            return ActionResult(
                ActionOutcome.FAILED, f"drain of {node} did not stick (now {seen})", {"node": node}
            )
        return ActionResult(ActionOutcome.APPLIED, f"drained {node}: {_describe(after)}", {"node": node})

    def _undrain(self, node: str, *, dry_run: bool) -> ActionResult:
        current = self.scontrol.node(node)
        if current is None:
            return ActionResult(ActionOutcome.FAILED, f"node {node} is unknown to Slurm", {"node": node})
        if not current.drained:
            return ActionResult(ActionOutcome.NOOP, f"node {node} is not drained ({_describe(current)})")
        if not current.drained_by_trainwarden:
            detail = f"refused: node {node} was drained by someone else ({_describe(current)}); not resumed"
            return ActionResult(ActionOutcome.FAILED, detail, {"node": node, "refused": "foreign_drain"})
        if dry_run:
            return ActionResult(
                ActionOutcome.DRY_RUN, f"would resume {node} ({_describe(current)})", {"node": node}
            )
        self.scontrol.resume(node)
        after = self.scontrol.node(node)
        if after is None or after.drained:
            seen = "gone" if after is None else _describe(after)
            return ActionResult(
                ActionOutcome.FAILED, f"resume of {node} did not stick (now {seen})", {"node": node}
            )
        return ActionResult(ActionOutcome.APPLIED, f"resumed {node}: {_describe(after)}", {"node": node})


HEALER = SlurmDrainHealer
