"""The one way trainwarden runs external commands: argument lists, validated values, timeouts.

Healers call tools such as `scontrol` or an operator's own drain script. Their arguments can carry
text that came from outside (an alert label, a node name in a training record), so nothing here
ever goes through a shell: a command is an argument list, and each `{placeholder}` in an argument
is filled only with a value that matched the strict pattern of its kind. Anything else is refused
with an error naming the placeholder and the value, and counted.
"""

from __future__ import annotations

import enum
import os
import re
import signal
import string
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainwarden.errors import TrainwardenError
from trainwarden.model import MetricKind, MetricSpec, Sample

MAX_OUTPUT_BYTES = 8192
"""Captured stdout/stderr are cut to this many bytes (the tail is kept: errors come last)."""

NODE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})$")
"""A host or node name (Slurm NodeName, Kubernetes node, DNS label/subdomain)."""

JOB_ID = re.compile(r"^[0-9]{1,12}(?:[_+][0-9]{1,9})?$")
"""A Slurm job id, optionally an array task (`123_4`) or heterogeneous component (`123+1`)."""

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A trainwarden job name (as in the control file)."""

REASON_MAX_CHARS = 200
_REASON_KEEP = re.compile(r"[^A-Za-z0-9 ._,:;()/#%+@-]")

PLACEHOLDER_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "node": NODE_NAME,
    "job_id": JOB_ID,
    "job": JOB_NAME,
}
"""Placeholder name → the pattern its value must match; `reason` is sanitised instead."""

PLACEHOLDERS = frozenset({*PLACEHOLDER_PATTERNS, "reason"})


class CommandError(TrainwardenError):
    """A command could not be built (bad template or refused value)."""


class CommandRefusedError(CommandError):
    """A value did not match the pattern of its placeholder; nothing was run."""

    def __init__(self, placeholder: str, value: str, why: str) -> None:
        self.placeholder = placeholder
        self.value = value
        super().__init__(f"refused value {value[:80]!r} for {{{placeholder}}}: {why}")


def sanitize_reason(text: str, max_chars: int = REASON_MAX_CHARS) -> str:
    """Free text made safe to pass as one argument and to show in `scontrol`/`sinfo` output.

    Characters outside a small set (letters, digits, space and `._,:;()/#%+@-`) become `_`, so no
    quote, `=`, newline or control character survives; whitespace runs collapse; length is capped;
    leading dashes go, so a reason passed as its own argument is never read as an option.
    """
    cleaned = _REASON_KEEP.sub("_", " ".join(text.split()))
    return cleaned[:max_chars].lstrip("- ").strip()


def validate_value(placeholder: str, value: str) -> str:
    """Return `value` if it may fill `placeholder`, else raise `CommandRefusedError`."""
    if placeholder == "reason":
        return sanitize_reason(value)
    pattern = PLACEHOLDER_PATTERNS.get(placeholder)
    if pattern is None:
        raise CommandRefusedError(placeholder, value, f"unknown placeholder (known: {sorted(PLACEHOLDERS)})")
    if not isinstance(value, str) or not pattern.match(value):
        raise CommandRefusedError(placeholder, str(value), f"must match {pattern.pattern}")
    return value


def template_fields(argument: str) -> list[str]:
    """The placeholder names used in one argument; raise `CommandError` on a malformed template."""
    try:
        parsed = list(string.Formatter().parse(argument))
    except ValueError as exc:
        raise CommandError(f"argument {argument!r}: bad template: {exc}") from exc
    names = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise CommandError(f"argument {argument!r}: only plain {{name}} placeholders are allowed")
        names.append(name)
    return names


@dataclass(frozen=True)
class CommandTemplate:
    """An argument list with `{placeholder}`s, checked when built so config errors show at load."""

    argv: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.argv:
            raise CommandError("command is empty: give at least the program")
        if template_fields(self.argv[0]):
            raise CommandError(f"program {self.argv[0]!r} may not contain placeholders")
        for argument in self.argv:
            unknown = set(template_fields(argument)) - PLACEHOLDERS
            if unknown:
                raise CommandError(
                    f"argument {argument!r}: unknown placeholder(s) {sorted(unknown)} "
                    f"(known: {sorted(PLACEHOLDERS)})"
                )

    @property
    def fields(self) -> frozenset[str]:
        """Every placeholder the template uses."""
        return frozenset(name for argument in self.argv for name in template_fields(argument))

    def render(self, values: Mapping[str, str]) -> list[str]:
        """Fill every placeholder with its validated value; each argument stays one argument."""
        clean: dict[str, str] = {}
        for name in self.fields:
            if name not in values:
                raise CommandRefusedError(name, "", "no value given")
            clean[name] = validate_value(name, values[name])
            if not clean[name]:
                raise CommandRefusedError(name, values[name], "empty after sanitising")
            if clean[name].startswith("-"):  # the patterns exclude it; kept as a last guard
                raise CommandRefusedError(name, values[name], "may not start with '-'")
        return [argument.format_map(clean) for argument in self.argv]


class RunStatus(enum.StrEnum):
    """How a run ended; bounded values for the `result` metric label."""

    OK = "ok"
    FAILED = "failed"  # ran, exit status not 0
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"  # program missing or not executable
    REFUSED = "refused"  # a value was refused; nothing ran


@dataclass(frozen=True)
class CommandResult:
    """What a run produced; output is decoded leniently and truncated to its tail."""

    argv: tuple[str, ...]
    status: RunStatus
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the command ran and exited 0."""
        return self.status is RunStatus.OK

    def summary(self) -> str:
        """One line for logs and action details."""
        program = Path(self.argv[0]).name if self.argv else "?"
        if self.status is RunStatus.OK:
            return f"{program}: ok"
        if self.status is RunStatus.FAILED:
            tail = (self.stderr or self.stdout).strip().splitlines()
            return f"{program}: exit {self.returncode}: {tail[-1] if tail else 'no output'}"
        return f"{program}: {self.status.value}: {self.error}"


COMMAND_RUNS = MetricSpec(
    "trainwarden_command_runs_total",
    "External commands run by healers, by program name and result.",
    MetricKind.COUNTER,
    ("program", "result"),
)


def _tail(data: bytes, limit: int) -> str:
    if len(data) > limit:
        data = b"[truncated]..." + data[-limit:]
    return data.decode("utf-8", errors="replace")


@dataclass
class CommandRunner:
    """Runs argument lists with a timeout and counts every run by program and result.

    `env` adds to (never replaces) the daemon's environment, e.g. `SLURM_CONF`. The child gets its
    own session so a timeout kills the whole process group, not just the direct child.
    """

    env: Mapping[str, str] = field(default_factory=dict)
    max_output_bytes: int = MAX_OUTPUT_BYTES
    _counts: dict[tuple[str, str], int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run `argv` (a list, never a shell string) and return its result; never raises."""
        args = tuple(argv)
        start = time.monotonic()
        environ = {**os.environ, **self.env}
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environ,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            return self._count(CommandResult(args, RunStatus.NOT_FOUND, error=str(exc)))
        except OSError as exc:
            return self._count(CommandResult(args, RunStatus.FAILED, error=f"cannot start: {exc}"))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=5.0)
            except subprocess.TimeoutExpired:  # a grandchild left the group and holds the pipes
                out, err = b"", b""
            return self._count(
                CommandResult(
                    args,
                    RunStatus.TIMEOUT,
                    proc.returncode,
                    _tail(out, self.max_output_bytes),
                    _tail(err, self.max_output_bytes),
                    time.monotonic() - start,
                    f"no exit within {timeout:g} s; killed",
                )
            )
        status = RunStatus.OK if proc.returncode == 0 else RunStatus.FAILED
        return self._count(
            CommandResult(
                args,
                status,
                proc.returncode,
                _tail(out, self.max_output_bytes),
                _tail(err, self.max_output_bytes),
                time.monotonic() - start,
            )
        )

    def run_template(
        self, template: CommandTemplate, values: Mapping[str, str], timeout: float
    ) -> CommandResult:
        """Render and run; a refused value yields a REFUSED result (counted), nothing runs."""
        try:
            argv = template.render(values)
        except CommandRefusedError as exc:
            return self.refused(template.argv[0], str(exc))
        return self.run(argv, timeout)

    def refused(self, program: str, why: str) -> CommandResult:
        """Record a command that was not run because an input was refused."""
        return self._count(CommandResult((program,), RunStatus.REFUSED, error=why))

    def _count(self, result: CommandResult) -> CommandResult:
        key = (Path(result.argv[0]).name if result.argv else "?", result.status.value)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        return result

    def samples(self) -> list[Sample]:
        """`trainwarden_command_runs_total{program,result}` for the store/exporter."""
        with self._lock:
            counts = dict(self._counts)
        return [
            COMMAND_RUNS.sample(count, program=program, result=result)
            for (program, result), count in sorted(counts.items())
        ]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()
