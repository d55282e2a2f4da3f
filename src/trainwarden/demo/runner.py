"""`trainwarden demo`: the toy job under `trainwarden run`, four faults injected, each detected and healed.

Everything is real: torchrun with two gloo ranks, the daemon's collectors, rules, policy, journal
and healers, its HTTP endpoint (scrape it while the demo runs). Only the faults are scripted, and
each fires once. The job's and the daemon's own output goes to a log file in the demo directory so
the terminal shows only the story; `--keep` keeps the directory (config, journal, incident bundles
with every rank's stacks, checkpoints) for a look afterwards.
"""

# ruff: noqa: T201 - a command that tells a story on the terminal
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

from trainwarden.config import load_config
from trainwarden.demo.narrator import FaultReport, Narrator
from trainwarden.demo.scenario import JOB, ScriptedFault, config_text, scripted_faults, toy_command
from trainwarden.errors import TrainwardenError
from trainwarden.plugins import plugin_groups

DEFAULT_STEPS = 200
DEFAULT_PORT = 9871
EX_USAGE = 2
DEMO_DEPENDENCIES = ("numpy", "torch")
"""What the toy job imports beyond trainwarden itself."""
POLL_SECONDS = 0.2


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """True when 127.0.0.1:`port` can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def output_to(log_path: Path, terminal: TextIO) -> Iterator[TextIO]:
    """Send fds 1 and 2 (children inherit them) to `log_path`; yield a stream to the real terminal."""
    if terminal is not sys.stdout:
        yield terminal  # a caller's own stream (tests): leave the process's fds alone
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    term = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield term
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        term.close()


def _tail(narrator: Narrator, path: Path, stop: threading.Event) -> None:
    while not stop.wait(POLL_SECONDS):
        narrator.poll_job_events(path)
    narrator.poll_job_events(path)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    # SIGTERM ends the demo as Ctrl-C does: run_job's cleanup kills the job's whole process tree.
    raise KeyboardInterrupt


def run_demo(
    *, steps: int = DEFAULT_STEPS, port: int = DEFAULT_PORT, keep: bool = False, out: TextIO | None = None
) -> int:
    """Run the demo; 0 when the job completed and every fault was detected and healed."""
    from trainwarden.daemon.run_cli import run_job  # noqa: PLC0415 - the daemon only when running

    out = out if out is not None else sys.stdout
    try:
        faults = scripted_faults(steps)
    except ValueError as exc:
        print(f"trainwarden demo: {exc}", file=sys.stderr)
        return EX_USAGE
    missing = missing_dependencies()
    if missing:
        print(
            f"trainwarden demo: needs {' and '.join(missing)}, not installed here: "
            "pip install 'trainwarden[torch]' (or pip install numpy torch)",
            file=sys.stderr,
        )
        return EX_USAGE
    port = port or free_port()
    if not port_free(port):
        print(f"trainwarden demo: 127.0.0.1:{port} is in use; pick another with --port", file=sys.stderr)
        return EX_USAGE
    root = Path(tempfile.mkdtemp(prefix="trainwarden-demo-"))
    config_path, log_path = root / "config.toml", root / "demo.log"
    config_path.write_text(config_text(root, port), encoding="utf-8")
    config = load_config(config_path, plugin_groups())
    command = toy_command(root, steps, faults, free_port())
    started = time.time()
    code, reports, interrupted = 1, [], False
    with output_to(log_path, out) as term:
        _intro(term, root, port, steps, faults)
        narrator = Narrator(term, started, steps)
        stop = threading.Event()
        tail = threading.Thread(target=_tail, args=(narrator, root / "events.jsonl", stop), daemon=True)
        tail.start()
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            code = run_job(config, command, on_event=narrator.on_event, job=JOB)
        except KeyboardInterrupt:
            interrupted = True
            narrator.say(time.time(), "STOPPED", "interrupted; the job was killed")
        except TrainwardenError as exc:
            narrator.say(time.time(), "FAILED", f"the daemon could not run: {exc}")
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop.set()
            tail.join(5.0)
        reports = narrator.reports(faults)
        ok = code == 0 and not interrupted and all(r.ok for r in reports)
        _summary(term, narrator, reports, code=code, wall=time.time() - started, port=port)
        if keep or not ok:
            print(
                f"\nEverything is kept in {root} (config.toml, demo.log, state/ with the journal", file=term
            )
            print(f"and incident bundles). Try: trainwarden actions --state-dir {root / 'state'}", file=term)
    if not keep and ok:
        shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        return 130
    return 0 if ok else 1


def missing_dependencies(names: tuple[str, ...] = DEMO_DEPENDENCIES) -> list[str]:
    """The modules the toy job imports that this environment lacks, checked before anything starts."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def _intro(out: TextIO, root: Path, port: int, steps: int, faults: list[ScriptedFault]) -> None:
    print("trainwarden demo: a 2-rank CPU training job (torchrun, gloo) under supervision.", file=out)
    print(f"  metrics live at  http://127.0.0.1:{port}/metrics   (status: /status)", file=out)
    print(f"  daemon config    {root / 'config.toml'}", file=out)
    print(f"  job + daemon log {root / 'demo.log'}", file=out)
    print(f"\n{steps} steps; scripted faults, each fires once:", file=out)
    for fault in faults:
        print(f"  step {fault.step:>4}  rank {fault.rank}  {fault.what}", file=out)
    print("\nTimeline (seconds since start):", file=out)
    out.flush()


def _seconds(start: float | None, end: float | None) -> str:
    return "-" if start is None or end is None else f"{end - start:.1f}s"


def _summary(
    out: TextIO, narrator: Narrator, reports: list[FaultReport], *, code: int, wall: float, port: int
) -> None:
    print(f"\nSummary: job exited with status {code} after {wall:.0f}s", file=out)
    header = ("FAULT", "STEP", "DETECTED BY", "AFTER", "HEALED BY", "BACK IN", "STEPS LOST", "")
    rows = [header]
    for r in reports:
        healed = r.healed_by or "-"
        back = _seconds(r.detected_at, r.resumed_at) if r.fault.restarts else "-"
        verdict = r.verdict
        rows.append(
            (
                r.fault.kind,
                str(r.fault.step),
                r.detected_by or "-",
                _seconds(r.fired_at, r.detected_at),
                healed,
                back,
                str(r.steps_lost),
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    detections = sum(1 for e in narrator.events if e.kind.value == "finding_fired")
    actions = sum(1 for e in narrator.events if e.kind.value == "action_applied")
    final = narrator.final_step()
    print(
        f"  {sum(r.fired_at is not None for r in reports)} faults, {detections} detections, "
        f"{actions} actions applied, {sum(r.steps_lost for r in reports)} steps lost, "
        f"final step {'-' if final is None else final + 1}/{narrator.steps}",
        file=out,
    )
    print(f"  (metrics were at http://127.0.0.1:{port}/metrics)", file=out)
    out.flush()
