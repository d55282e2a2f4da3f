"""The `trainwarden` command line.

Each subcommand is one `add_*` function registering its parser and handler, listed once in
`COMMANDS`; heavy modules are imported inside handlers so `trainwarden status` stays instant.

Examples::

    trainwarden daemon --config /etc/trainwarden/config.toml
    trainwarden daemon --listen 127.0.0.1:9871 --runtime-dir /tmp/tw/run --state-dir /tmp/tw/state
    trainwarden check-config /etc/trainwarden/config.toml
    trainwarden status --url http://127.0.0.1:9871
"""
# Over 450 lines (issue 15): one argparse tree for every subcommand, so `--help`
# lists them all from one place (next split: `status` and `actions` printing into their own *_cli modules).

# ruff: noqa: T201 - a command line prints
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TextIO

from trainwarden import __version__

Subparsers = Any  # argparse's _SubParsersAction is private
DEFAULT_URL = "http://127.0.0.1:9871"
EX_CONFIG = 78
"""sysexits' "configuration error": the unit's RestartPreventExitStatus stops a restart loop on it."""
EX_BROKEN_PIPE = 141
"""What a shell reports for a command killed by SIGPIPE (128 + 13)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trainwarden` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except BrokenPipeError:
        # `trainwarden status | head`: the reader left. Python's own flush at exit would raise
        # again on the closed pipe, so point stdout at /dev/null first (as the docs recommend).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="trainwarden",
        description="Monitoring and self-healing daemon for PyTorch training jobs.",
        epilog="Run `trainwarden COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"trainwarden {__version__} (Python {platform.python_version()})",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


# --- daemon ---------------------------------------------------------------------------------


def _listen(text: str) -> str:
    from trainwarden.config import parse_listen  # noqa: PLC0415 - keep `status` light

    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def add_daemon(subparsers: Subparsers) -> None:
    """`trainwarden daemon`: run the node daemon in the foreground."""
    parser = subparsers.add_parser(
        "daemon",
        help="run the node daemon in the foreground (systemd runs this)",
        description="Run the node daemon. Flags override the config file for per-node settings.",
        epilog="example: trainwarden daemon --config /etc/trainwarden/config.toml --listen 0.0.0.0:9871",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: safe defaults)")
    parser.add_argument(
        "--listen", type=_listen, metavar="HOST:PORT", help="HTTP address (default 127.0.0.1:9871)"
    )
    parser.add_argument("--runtime-dir", type=Path, metavar="DIR", help="sockets and control files")
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="persistent state (journal)")
    parser.add_argument("--path.procfs", dest="procfs", type=Path, metavar="DIR", help="procfs mount point")
    parser.add_argument("--path.sysfs", dest="sysfs", type=Path, metavar="DIR", help="sysfs mount point")
    parser.set_defaults(func=run_daemon)


def run_daemon(args: argparse.Namespace) -> int:
    """Load the config, then run until SIGTERM/SIGINT."""
    from trainwarden.daemon.app import Daemon, Overrides, load  # noqa: PLC0415 - lazy
    from trainwarden.errors import ConfigError, TrainwardenError  # noqa: PLC0415

    overrides = Overrides(
        listen=args.listen,
        runtime_dir=args.runtime_dir,
        state_dir=args.state_dir,
        procfs=args.procfs,
        sysfs=args.sysfs,
    )
    setup_logging("info")
    try:
        config = load(args.config, overrides)
    except ConfigError as exc:
        print(f"trainwarden: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.daemon.log_level)
    daemon = Daemon(config, config_path=args.config, overrides=overrides)
    try:
        return daemon.run()
    except TrainwardenError as exc:
        logging.getLogger("trainwarden").error("%s", exc)  # noqa: TRY400 - a clear message, no traceback
        return 1


class _JournalFormatter(logging.Formatter):
    """Under systemd: `<N>` syslog priority prefixes for journald and no timestamp (it adds one)."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str) -> None:
    """Log to stderr; journald-friendly when started by systemd (JOURNAL_STREAM set)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("trainwarden").setLevel(level.upper())


# --- check-config ---------------------------------------------------------------------------


def add_check_config(subparsers: Subparsers) -> None:
    """`trainwarden check-config FILE`: validate a config without running anything."""
    parser = subparsers.add_parser(
        "check-config",
        help="validate a config file and print every problem",
        description="Validate a TOML config. Prints every problem (section, key, why); exit 1 if any.",
        epilog="example: trainwarden check-config examples/config.toml",
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.set_defaults(func=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    """Print OK with a summary, or every problem and exit 1."""
    from trainwarden.config import load_config  # noqa: PLC0415 - lazy
    from trainwarden.errors import ConfigError  # noqa: PLC0415
    from trainwarden.plugins import plugin_groups  # noqa: PLC0415

    try:
        config = load_config(args.file, plugin_groups())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for group, plugins in config.plugins.items():
        enabled = [name for name, options in plugins.items() if options.enabled]
        print(f"{group}: {', '.join(enabled) or 'none'} enabled")
    print(f"{args.file}: OK")
    return 0


# --- status ---------------------------------------------------------------------------------


def add_status(subparsers: Subparsers) -> None:
    """`trainwarden status`: ask the running daemon how it is doing."""
    parser = subparsers.add_parser(
        "status",
        help="show the running daemon's health and collectors",
        description="Fetch /status from a running daemon and print a readable summary.",
        epilog="example: trainwarden status --url http://127.0.0.1:9871",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"daemon base URL (default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the raw JSON instead")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    parser.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    """Print the summary; exit 1 when the daemon cannot be reached, 3 while it is not ready."""
    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 - operator's URL
            data = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"trainwarden: cannot read {url}: {reason} (is the daemon running?)", file=sys.stderr)
        return 1
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print_status(data, sys.stdout)
    return 0 if data.get("ready") else 3


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def print_status(data: dict[str, Any], out: TextIO) -> None:
    """Readable summary of a `/status` document."""
    ready = "ready" if data.get("ready") else "STARTING (first collection not finished)"
    print(
        f"trainwarden {data.get('version')}  pid {data.get('pid')}  "
        f"up {_duration(float(data.get('uptime_seconds', 0)))}  {ready}",
        file=out,
    )
    config = data.get("config", {})
    reload = config.get("last_reload") or {}
    reload_text = (
        "ok" if reload.get("ok", True) else f"FAILED, running the previous config: {reload.get('error')}"
    )
    print(f"config:  {config.get('source')} (last load {reload_text})", file=out)
    print(f"listen:  {data.get('listen')}   series: {data.get('series')}", file=out)
    collectors: dict[str, dict[str, Any]] = data.get("collectors", {})
    fake = (collectors.get("gpu", {}).get("detail") or {}).get("fake_nvml")
    if fake:
        print(
            f"WARNING: FAKE GPUs: the GPU series come from the NVML fixture {fake}, not this node", file=out
        )
    if collectors:
        print(file=out)
        header = ("COLLECTOR", "STATE", "LAST RUN", "SERIES", "ERRORS", "TIMEOUTS", "SKIPPED", "LAST ERROR")
        rows = [header]
        for name, c in sorted(collectors.items()):
            skipped = sum((c.get("skipped_total") or {}).values())
            duration = c.get("last_duration_seconds")
            rows.append(
                (
                    name,
                    str(c.get("state", "?")),
                    "-"
                    if duration is None or c.get("state") == "unavailable"
                    else f"{duration * 1000:.1f}ms",
                    str(c.get("series", "-")),
                    str(c.get("errors_total", "-")),
                    str(c.get("timeouts_total", "-")),
                    str(skipped) if "skipped_total" in c else "-",
                    str(c.get("last_error") or ""),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
            print("  ".join([*cells, row[-1]]).rstrip(), file=out)
        details = [(name, c["detail"]) for name, c in sorted(collectors.items()) if c.get("detail")]
        if details:
            print("\ndetails (full: --json):", file=out)
            for name, detail in details:
                text = json.dumps(detail, sort_keys=True)
                print(f"  {name}: {text if len(text) <= 160 else text[:157] + '...'}", file=out)
    from trainwarden.goodput_report import status_goodput_lines  # noqa: PLC0415 - keep `status` light

    out.write("".join(f"{line}\n" for line in status_goodput_lines(data)))
    known = {"version", "pid", "started_at", "uptime_seconds", "ready", "listen", "config", "paths", "series"}
    known.add("goodput")
    for key, value in data.items():
        if key not in known and key != "collectors":
            print(f"\n{key}: {json.dumps(value, sort_keys=True)}", file=out)


# --- actions ---------------------------------------------------------------------------------


def add_actions(subparsers: Subparsers) -> None:
    """`trainwarden actions`: print the decision journal."""
    parser = subparsers.add_parser(
        "actions",
        help="print the policy's decisions (taken, refused, failed), newest last",
        description="Read the decision journal in the state directory (no running daemon needed).",
        epilog="example: trainwarden actions --state-dir /var/lib/trainwarden --limit 20",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML config (for daemon.state_dir)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="state directory holding the journal")
    parser.add_argument("--limit", type=int, default=50, help="newest N entries (default 50)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(func=run_actions)


def run_actions(args: argparse.Namespace) -> int:
    """Print the newest entries; exit 1 when the journal cannot be read."""
    from trainwarden.daemon.actions_cli import format_actions  # noqa: PLC0415 - lazy
    from trainwarden.daemon.app import Overrides, load  # noqa: PLC0415
    from trainwarden.errors import ConfigError, TrainwardenError  # noqa: PLC0415
    from trainwarden.journal import JOURNAL_NAME, Journal  # noqa: PLC0415

    try:
        config = load(args.config, Overrides(state_dir=args.state_dir))
    except ConfigError as exc:
        print(f"trainwarden: {exc}", file=sys.stderr)
        return EX_CONFIG
    path = config.daemon.state_dir / JOURNAL_NAME
    if not path.exists():
        print(f"trainwarden: no journal at {path} (pass --state-dir or --config)", file=sys.stderr)
        return 1
    try:
        journal = Journal(path)
        try:
            sys.stdout.write(format_actions(journal, args.limit, as_json=args.json))
        finally:
            journal.close()
    except (TrainwardenError, ValueError) as exc:
        print(f"trainwarden: {exc}", file=sys.stderr)
        return 1
    return 0


# --- run ------------------------------------------------------------------------------------


def add_run(subparsers: Subparsers) -> None:
    """`trainwarden run -- CMD ARGS…`: supervise a training command with the daemon in-process."""
    parser = subparsers.add_parser(
        "run",
        help="run a training command under supervision (restart on crash or hang, resume)",
        description=(
            "Run the daemon in this process and CMD as its child process group. Restarts (and the job's "
            "resume) happen only when the config enables actions ([policy] actions_enabled = true); the "
            "exit status is the job's final one."
        ),
        epilog=(
            "example: trainwarden run --config demo.toml -- "
            "torchrun --nproc-per-node 2 train.py --ckpt-dir /tmp/ckpt"
        ),
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: observe-only)")
    parser.add_argument(
        "--job", metavar="NAME", help="job name (default $TRAINWARDEN_JOB or the program name)"
    )
    parser.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="HTTP address for /metrics")
    parser.add_argument("--runtime-dir", type=Path, metavar="DIR", help="socket and control files")
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="journal, findings, incidents")
    parser.add_argument("--no-preflight", action="store_true", help="start without checking the node first")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the job to run")
    parser.set_defaults(func=run_run)


def run_run(args: argparse.Namespace) -> int:
    """Run the job; exit with its final status (EX_CONFIG on a bad config, 2 without a command)."""
    from trainwarden.daemon.app import Overrides, load  # noqa: PLC0415 - lazy
    from trainwarden.daemon.run_cli import private_dirs, run_job  # noqa: PLC0415
    from trainwarden.errors import ConfigError, TrainwardenError  # noqa: PLC0415

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "trainwarden run: give the command after --, e.g. trainwarden run -- python train.py",
            file=sys.stderr,
        )
        return 2
    setup_logging("info")
    try:
        config = load(
            args.config, Overrides(listen=args.listen, runtime_dir=args.runtime_dir, state_dir=args.state_dir)
        )
    except ConfigError as exc:
        print(f"trainwarden: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.daemon.log_level)

    def show(event: Any) -> None:
        print(f"trainwarden: {event.line()}", file=sys.stderr, flush=True)

    from trainwarden.daemon.preflight_cli import preflight_before_run  # noqa: PLC0415

    if not args.no_preflight and preflight_before_run(config) != 0:
        return 1
    try:
        return run_job(private_dirs(config), command, on_event=show, job=args.job, handle_signals=True)
    except TrainwardenError as exc:
        logging.getLogger("trainwarden").error("%s", exc)  # noqa: TRY400 - a clear message, no traceback
        return 1


# --- demo -----------------------------------------------------------------------------------


def add_demo(subparsers: Subparsers) -> None:
    """`trainwarden demo`: a toy job under supervision, faults injected, detected and healed."""
    parser = subparsers.add_parser(
        "demo",
        help="watch a toy training job get faults and be healed (about two minutes, CPU only)",
        description=(
            "Run a tiny 2-rank CPU training job (torchrun, gloo) under the daemon with actions enabled, "
            "inject a loss spike, a hung rank, a crashed rank and a NaN burst, and print each one "
            "being detected and healed as it happens. Needs torch (pip install 'trainwarden[torch]')."
        ),
        epilog="example: trainwarden demo --port 9871 --keep",
    )
    parser.add_argument("--port", type=int, default=9871, help="metrics port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (at least 160; default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the demo directory (journal, incidents)")
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when the job completed and every fault was healed."""
    from trainwarden.demo.runner import run_demo  # noqa: PLC0415 - lazy

    setup_logging("info")
    return run_demo(steps=args.steps, port=args.port, keep=args.keep)


# --- install --------------------------------------------------------------------------------


def add_install(subparsers: Subparsers) -> None:
    """`trainwarden install systemd`: write the unit, config and shipped extras where they go."""
    parser = subparsers.add_parser(
        "install",
        help="install the systemd unit (for this environment's trainwarden) and the example config",
        description=(
            "Write PREFIX/etc/systemd/system/trainwarden.service with ExecStart pointing at this "
            "environment's trainwarden, PREFIX/etc/trainwarden/config.toml when absent, and the shipped "
            "dashboards and Prometheus rules under PREFIX/usr/local/share/trainwarden. Prints every path."
        ),
        epilog="example: sudo /opt/trainwarden/bin/trainwarden install systemd --prefix /",
    )
    parser.add_argument("what", choices=["systemd"], help="what to install")
    parser.add_argument("--prefix", type=Path, default=Path("/"), help="root to install under (default /)")
    parser.set_defaults(func=run_install)


def run_install(args: argparse.Namespace) -> int:
    """Install and print what was written; exit 1 when something cannot be written."""
    from trainwarden.daemon.install_cli import InstallError, install_systemd  # noqa: PLC0415 - lazy

    try:
        written = install_systemd(args.prefix)
    except InstallError as exc:
        print(f"trainwarden: {exc}", file=sys.stderr)
        return 1
    for item in written:
        print(f"{item.what}: {item.path}")
    print("next: systemctl daemon-reload && systemctl enable --now trainwarden")
    return 0


def add_preflight(subparsers: Subparsers) -> None:
    """`trainwarden preflight`: check this node before a job starts (daemon/preflight_cli.py)."""
    from trainwarden.daemon.preflight_cli import add_preflight as add  # noqa: PLC0415 - lazy

    add(subparsers)


COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_daemon,
    add_check_config,
    add_status,
    add_actions,
    add_run,
    add_demo,
    add_install,
    add_preflight,
)
"""Every subcommand; adding one is a function above and one line here."""


if __name__ == "__main__":
    sys.exit(main())
