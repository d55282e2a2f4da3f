"""The safe command runner: templates, validated values, timeouts, truncation and counting."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from trainwarden.commands import (
    CommandError,
    CommandRefusedError,
    CommandRunner,
    CommandTemplate,
    RunStatus,
    sanitize_reason,
    validate_value,
)

PY = sys.executable


def test_render_fills_each_argument_without_splitting() -> None:
    """A value with spaces stays one argument: there is no shell to split it."""
    template = CommandTemplate(("drain", "--node={node}", "{reason}"))
    argv = template.render({"node": "gpu-07", "reason": "xid 79; rm -rf /"})
    assert argv == ["drain", "--node=gpu-07", "xid 79; rm -rf /"]


@pytest.mark.parametrize(
    ("placeholder", "value"),
    [
        ("node", "gpu-07; reboot"),
        ("node", "$(id)"),
        ("node", "a b"),
        ("node", ""),
        ("node", "../../etc"),
        ("job_id", "12 34"),
        ("job_id", "12;34"),
        ("job_id", "abc"),
        ("job", "x/../y"),
    ],
)
def test_values_outside_the_pattern_are_refused(placeholder: str, value: str) -> None:
    """Node names, job ids and job names that do not match their strict pattern are refused."""
    with pytest.raises(CommandRefusedError, match=placeholder):
        validate_value(placeholder, value)


def test_option_like_values_never_become_options() -> None:
    """A node name starting with '-' is refused, and a reason loses its leading dashes."""
    template = CommandTemplate(("tool", "{node}", "{reason}"))
    with pytest.raises(CommandRefusedError, match="node"):
        template.render({"node": "-all", "reason": "r"})
    assert template.render({"node": "n1", "reason": "--force -x"}) == ["tool", "n1", "force -x"]


def test_valid_values_pass() -> None:
    """Ordinary node names and Slurm job ids (array, het) are accepted unchanged."""
    assert validate_value("node", "gpu-07.cluster.local") == "gpu-07.cluster.local"
    assert validate_value("job_id", "1234_7") == "1234_7"
    assert validate_value("job_id", "1234+1") == "1234+1"


def test_reason_is_sanitised() -> None:
    """Quotes, '=', newlines and control characters never survive into a reason; length is capped."""
    text = sanitize_reason('bad "gpu"=3\n\x1b[31mred\t' + "x" * 500)
    assert '"' not in text
    assert "=" not in text
    assert "\n" not in text
    assert "\x1b" not in text
    assert text.startswith("bad _gpu__3 _")
    assert len(text) <= 200


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "empty"),
        (("{node}",), "program"),
        (("tool", "{nope}"), "unknown placeholder"),
        (("tool", "{node!r}"), "plain"),
        (("tool", "{node:>10}"), "plain"),
        (("tool", "{node"), "bad template"),
    ],
)
def test_bad_templates_are_rejected_when_built(argv: tuple[str, ...], message: str) -> None:
    """Template mistakes show when the config loads, not when a node is failing."""
    with pytest.raises(CommandError, match=message):
        CommandTemplate(argv)


def test_run_captures_output_and_status() -> None:
    """A real process's stdout, stderr and exit status come back in the result."""
    result = CommandRunner().run(
        [PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 10
    )
    assert result.status is RunStatus.FAILED
    assert result.returncode == 3
    assert result.stdout.strip() == "out"
    assert result.stderr.strip() == "err"
    assert "exit 3: err" in result.summary()


def test_run_missing_program_is_not_found() -> None:
    """A program that does not exist gives NOT_FOUND, not an exception."""
    result = CommandRunner().run(["/nonexistent/trainwarden-tool"], 5)
    assert result.status is RunStatus.NOT_FOUND
    assert not result.ok


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """On timeout the child and its own children are killed, and the result says TIMEOUT."""
    marker = tmp_path / "grandchild-pid"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    result = CommandRunner().run([PY, "-c", script], 1.5)
    assert result.status is RunStatus.TIMEOUT
    grandchild = int(marker.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{grandchild}/stat").read_text().split()
        if stat[2] == "Z":
            break
        time.sleep(0.05)
    alive = (
        Path(f"/proc/{grandchild}/stat").exists()
        and Path(f"/proc/{grandchild}/stat").read_text().split()[2] != "Z"
    )
    assert not alive


def test_output_is_truncated_to_its_tail() -> None:
    """Huge output is cut to the configured size, keeping the end where errors are."""
    runner = CommandRunner(max_output_bytes=100)
    result = runner.run([PY, "-c", "print('a' * 100000 + 'THE END')"], 10)
    assert len(result.stdout) < 200
    assert result.stdout.rstrip().endswith("THE END")
    assert result.stdout.startswith("[truncated]")


def test_env_is_added_to_the_daemon_environment() -> None:
    """`env` adds variables (e.g. SLURM_CONF) without dropping PATH."""
    runner = CommandRunner(env={"TW_TEST_VALUE": "42"})
    result = runner.run(
        [PY, "-c", "import os; print(os.environ['TW_TEST_VALUE'], bool(os.environ.get('PATH')))"], 10
    )
    assert result.stdout.split() == ["42", "True"]


def test_refused_template_runs_nothing_and_is_counted(tmp_path: Path) -> None:
    """A refused value yields a REFUSED result, the program never runs, and the metric counts it."""
    witness = tmp_path / "ran"
    runner = CommandRunner()
    template = CommandTemplate((PY, "-c", f"open({str(witness)!r}, 'w')", "{node}"))
    result = runner.run_template(template, {"node": "x; touch /tmp/pwned"}, 10)
    assert result.status is RunStatus.REFUSED
    assert "refused value" in result.error
    assert not witness.exists()
    ok = runner.run_template(template, {"node": "gpu-1"}, 10)
    assert ok.ok
    counts = {dict(s.labels)["result"]: s.value for s in runner.samples()}
    assert counts == {"ok": 1.0, "refused": 1.0}
    assert {dict(s.labels)["program"] for s in runner.samples()} == {Path(PY).name}
    assert all(s.spec.name == "trainwarden_command_runs_total" for s in runner.samples())
