"""The command drain healer runs the operator's real scripts with validated arguments, never a shell."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainwarden.config import config_from_dict
from trainwarden.errors import ConfigError
from trainwarden.healers.base import Action, ActionOutcome, HealerContext
from trainwarden.healers.command_drain import CommandDrainHealer, CommandDrainOptions

# A tiny "site drain tool": records each call's argv in a JSON-lines log and keeps drained nodes in
# a state file; `check` exits 0 when the node is drained and 1 when it is not.
TOOL = """\
import json, sys, time
from pathlib import Path
state, log, verb = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
args = sys.argv[4:]
with log.open("a") as f:
    f.write(json.dumps([verb, *args]) + "\\n")
drained = set(state.read_text().split()) if state.exists() else set()
if verb == "check":
    sys.exit(0 if args[0] in drained else 1)
if verb == "drain":
    if args[0] == "broken-node":
        print("drain-node: cannot reach the CMDB", file=sys.stderr)
        sys.exit(2)
    if args[0] == "slow-node":
        time.sleep(30)
    drained.add(args[0])
if verb == "undrain":
    drained.discard(args[0])
state.write_text(" ".join(sorted(drained)))
"""


@pytest.fixture
def tool(tmp_path: Path) -> tuple[list[str], Path, Path]:
    script = tmp_path / "drain_tool.py"
    script.write_text(TOOL)
    state, log = tmp_path / "drained.txt", tmp_path / "calls.jsonl"
    return [sys.executable, str(script), str(state), str(log)], state, log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def make(
    tool: tuple[list[str], Path, Path], *, check: bool = True, timeout: float = 20.0
) -> CommandDrainHealer:
    base, _, _ = tool
    options = CommandDrainOptions(
        enabled=True,
        drain_argv=(*base, "drain", "{node}", "--reason", "trainwarden: {reason}"),
        undrain_argv=(*base, "undrain", "{node}"),
        check_argv=(*base, "check", "{node}") if check else (),
        timeout_seconds=timeout,
    )
    return CommandDrainHealer(options, HealerContext())


def drain(node: str, reason: str = "xid 79") -> Action:
    return Action("command_drain", f"d-{node}", reason, subject={"node": node})


def test_drain_runs_the_command_with_each_value_as_one_argument(tool: tuple[list[str], Path, Path]) -> None:
    """The argv runs with {node} and {reason} filled; a reason with spaces and `;` stays one argument."""
    result = make(tool).apply(drain("gpu-7", "xid 79; reboot now"), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert calls(tool[2]) == [
        ["check", "gpu-7"],
        ["drain", "gpu-7", "--reason", "trainwarden: xid 79; reboot now"],
    ]
    assert tool[1].read_text() == "gpu-7"


def test_check_makes_a_repeated_drain_a_noop(tool: tuple[list[str], Path, Path]) -> None:
    """When the check command says the node is drained, the drain command is not run again."""
    healer = make(tool)
    assert healer.apply(drain("gpu-7"), dry_run=False).outcome is ActionOutcome.APPLIED
    again = healer.apply(drain("gpu-7"), dry_run=False)
    assert again.outcome is ActionOutcome.NOOP
    assert [c[0] for c in calls(tool[2])] == ["check", "drain", "check"]


def test_undrain_and_its_noop(tool: tuple[list[str], Path, Path]) -> None:
    """Undrain runs the undrain command; on a node that is not drained it is a NOOP."""
    healer = make(tool)
    healer.apply(drain("gpu-7"), dry_run=False)
    action = Action("command_drain", "u", "ok", subject={"node": "gpu-7"}, params={"operation": "undrain"})
    assert healer.apply(action, dry_run=False).outcome is ActionOutcome.APPLIED
    assert tool[1].read_text() == ""
    assert healer.apply(action, dry_run=False).outcome is ActionOutcome.NOOP


def test_dry_run_runs_only_the_check(tool: tuple[list[str], Path, Path]) -> None:
    """A dry run shows the argv it would run and changes nothing."""
    result = make(tool).apply(drain("gpu-7"), dry_run=True)
    assert result.outcome is ActionOutcome.DRY_RUN
    assert "'drain', 'gpu-7'" in result.detail
    assert [c[0] for c in calls(tool[2])] == ["check"]
    assert not tool[1].exists()


def test_failing_command_reports_its_stderr(tool: tuple[list[str], Path, Path]) -> None:
    """A non-zero exit is a FAILED result quoting the command's last stderr line."""
    result = make(tool, check=False).apply(drain("broken-node"), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "exit 2: drain-node: cannot reach the CMDB" in result.detail


def test_hanging_command_times_out(tool: tuple[list[str], Path, Path]) -> None:
    """A command that does not finish in time is killed and reported as a timeout."""
    result = make(tool, check=False, timeout=1.0).apply(drain("slow-node"), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "timeout" in result.detail


def test_hostile_node_value_never_runs(tool: tuple[list[str], Path, Path]) -> None:
    """A node name carrying shell text is refused before anything runs, and counted."""
    healer = make(tool)
    result = healer.apply(drain("gpu-7; rm -rf /"), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert result.data["refused"] == "bad_input"
    assert calls(tool[2]) == []
    assert [dict(s.labels)["result"] for s in healer.samples()] == ["refused"]


def test_operation_without_a_command_is_refused(tool: tuple[list[str], Path, Path]) -> None:
    """An undrain with no undrain_argv configured is refused with a message saying so."""
    base, _, _ = tool
    options = CommandDrainOptions(enabled=True, drain_argv=(*base, "drain", "{node}"))
    healer = CommandDrainHealer(options, HealerContext())
    action = Action("command_drain", "u", "ok", subject={"node": "gpu-7"}, params={"operation": "undrain"})
    result = healer.apply(action, dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "no command configured for operation 'undrain'" in result.detail


def test_config_errors_name_the_key() -> None:
    """Enabled without drain_argv, or an unknown placeholder, are config errors naming the key."""
    groups = {"healers": {"command_drain": CommandDrainOptions}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(
            {"healers": {"command_drain": {"enabled": True, "undrain_argv": ["x", "{host}"]}}}, groups
        )
    text = str(info.value)
    assert "[healers.command_drain] drain_argv: required when the healer is enabled" in text
    assert "[healers.command_drain] undrain_argv:" in text
    assert "unknown placeholder(s) ['host']" in text
    assert config_from_dict({}, groups).plugin("healers", "command_drain").enabled is False
