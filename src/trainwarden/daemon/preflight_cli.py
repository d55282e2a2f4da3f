"""`trainwarden preflight`: is this node fit to start a job? One line per check, exit 0 or not.

Used as a Slurm `Prolog`/`HealthCheckProgram` (deploy/slurm/), a Kubernetes init container
(deploy/kubernetes/) and before `trainwarden run` starts its command. Examples::

    trainwarden preflight --checkpoint-dir /scratch/ckpt
    trainwarden preflight --config /etc/trainwarden/config.toml --json
    trainwarden preflight --expect-gpus 8 --drain        # Slurm: drain this node when unhealthy
"""

# ruff: noqa: T201 - a command line prints
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from trainwarden.preflight.model import GIB, MIB, PreflightOptions

if TYPE_CHECKING:
    from trainwarden.config import Config

Subparsers = Any  # argparse's _SubParsersAction is private
EX_UNHEALTHY = 1
EX_CONFIG = 78
log = logging.getLogger(__name__)


def add_preflight(subparsers: Subparsers) -> None:
    """Register `trainwarden preflight`."""
    parser = subparsers.add_parser(
        "preflight",
        help="check this node before a job starts (GPUs, XIDs, ECC, links, checkpoint volume)",
        description=(
            "Check this node with the daemon's own collectors and rules, bounded by --timeout. Prints one "
            "line per check (PASS / FAIL / SKIPPED with the reason); exit 0 when healthy, 1 when any check "
            "failed (the reasons go to stderr), 78 on a bad config or option."
        ),
        epilog="example: trainwarden preflight --checkpoint-dir /scratch/ckpt --expect-gpus 8",
    )
    add_preflight_arguments(parser)
    parser.set_defaults(func=run_preflight_command)


def add_preflight_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `trainwarden preflight` (shared with anything that embeds it)."""
    d = PreflightOptions()
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="daemon config (state dir, paths, volumes)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        default=d.timeout_seconds,
        metavar="S",
        help="bound on everything (%(default)s)",
    )
    parser.add_argument("--checkpoint-dir", type=Path, metavar="DIR", help="the job's checkpoint volume")
    parser.add_argument(
        "--expect-gpus",
        type=int,
        default=d.expect_gpus,
        metavar="N",
        help="fail with fewer GPUs (%(default)s)",
    )
    parser.add_argument(
        "--min-free-gib", type=float, default=d.min_free_bytes / GIB, metavar="G", help="(%(default)s)"
    )
    parser.add_argument(
        "--write-probe-mib", type=int, default=d.write_probe_bytes // MIB, metavar="M", help="(%(default)s)"
    )
    parser.add_argument(
        "--min-write-mib-per-second",
        type=float,
        default=d.min_write_bytes_per_second / MIB,
        metavar="M",
        help="write throughput floor, fsync included (%(default)s)",
    )
    parser.add_argument(
        "--xid-lookback", type=float, default=d.xid_lookback_seconds, metavar="S", help="(%(default)s)"
    )
    parser.add_argument(
        "--infiniband-min-rate-gbps",
        type=float,
        default=d.infiniband_min_rate_gbps,
        metavar="G",
        help="port rate floor (%(default)s: any)",
    )
    parser.add_argument("--daemon-url", metavar="URL", help="the node daemon (default: its listen address)")
    parser.add_argument("--collective", action="store_true", help="also time an all-reduce among local ranks")
    parser.add_argument(
        "--collective-ranks", type=int, default=d.collective_ranks, metavar="N", help="(%(default)s)"
    )
    parser.add_argument(
        "--collective-mib", type=float, default=d.collective_bytes / MIB, metavar="M", help="(%(default)s)"
    )
    parser.add_argument(
        "--min-collective-mib-per-second",
        type=float,
        default=d.min_collective_bytes_per_second / MIB,
        metavar="M",
        help="bus-bandwidth floor (%(default)s)",
    )
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="where the result and journal go")
    parser.add_argument("--node", metavar="NAME", help="node name (default $SLURMD_NODENAME or the config's)")
    parser.add_argument("--no-record", action="store_true", help="write neither result file nor journal row")
    parser.add_argument(
        "--after-job", default="", metavar="JOB", help="record the run as the end of this job"
    )
    parser.add_argument(
        "--drain", action="store_true", help="on failure, drain this node in Slurm (scontrol)"
    )
    parser.add_argument("--path.procfs", dest="procfs", type=Path, metavar="DIR", help="procfs mount point")
    parser.add_argument("--path.sysfs", dest="sysfs", type=Path, metavar="DIR", help="sysfs mount point")
    parser.add_argument("--path.devfs", dest="devfs", type=Path, metavar="DIR", help="devfs (kmsg) root")


def options_from_args(args: argparse.Namespace) -> PreflightOptions:
    """PreflightOptions from the daemon config (if any) and the flags; raises ConfigError."""
    if args.config is None:
        # The defaults need no plugin registry: importing every collector, rule and healer (and
        # the daemon) to validate an absent file would double a prolog's start-up time.
        from trainwarden.config import Config  # noqa: PLC0415 - lazy

        config = Config()
    else:
        from trainwarden.daemon.app import load  # noqa: PLC0415

        config = load(args.config)
    config = replace(
        config,
        daemon=replace(config.daemon, state_dir=args.state_dir or config.daemon.state_dir),
        paths=replace(
            config.paths, procfs=args.procfs or config.paths.procfs, sysfs=args.sysfs or config.paths.sysfs
        ),
    )
    options = options_from_config(config, node_name=args.node)
    options = replace(
        options,
        paths=options.paths if args.devfs is None else replace(options.paths, devfs=args.devfs),
        timeout_seconds=args.timeout,
        expect_gpus=args.expect_gpus,
        checkpoint_dir=args.checkpoint_dir or options.checkpoint_dir,
        min_free_bytes=int(args.min_free_gib * GIB),
        write_probe_bytes=int(args.write_probe_mib * MIB),
        min_write_bytes_per_second=args.min_write_mib_per_second * MIB,
        xid_lookback_seconds=args.xid_lookback,
        infiniband_min_rate_gbps=args.infiniband_min_rate_gbps,
        daemon_url=args.daemon_url or options.daemon_url,
        collective=args.collective,
        collective_ranks=args.collective_ranks,
        collective_bytes=int(args.collective_mib * MIB),
        min_collective_bytes_per_second=args.min_collective_mib_per_second * MIB,
        after_job=args.after_job,
    )
    _check(options)
    return options


def options_from_config(config: Config, node_name: str | None = None) -> PreflightOptions:
    """Defaults for a node run by `config`: its paths, state dir, daemon address, `checkpoints` volume."""
    volumes = getattr(config.plugins.get("collectors", {}).get("disk_usage"), "volumes", {})
    host, _, port = config.daemon.listen.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host  # noqa: S104 - we connect, not bind
    return PreflightOptions(
        paths=config.paths.host_paths(),
        state_dir=config.daemon.state_dir,
        node_name=node_name or os.environ.get("SLURMD_NODENAME") or config.daemon.node_name,
        checkpoint_dir=volumes.get("checkpoints"),
        daemon_url=f"http://{host}:{port}",
    )


def _check(options: PreflightOptions) -> None:
    from trainwarden.errors import ConfigError, ConfigProblem  # noqa: PLC0415 - lazy

    problems = options.problems()
    if problems:
        raise ConfigError(
            [ConfigProblem("", f"--{name}", why) for name, why in problems], "trainwarden preflight"
        )


def preflight_before_run(config: Config) -> int:
    """`trainwarden run`'s pre-start hook: the default preflight of this node, report on stderr.

    Returns 0 to start the job, 1 to refuse (the reasons printed); skip it with --no-preflight.
    """
    options = options_from_config(config)
    code = preflight_main(options, as_json=False, record=True, drain=False, out=sys.stderr)
    if code:
        print(
            "trainwarden run: preflight failed, the job is not started (--no-preflight skips it)",
            file=sys.stderr,
        )
    return code


def run_preflight_command(args: argparse.Namespace) -> int:
    """Run, print, record, optionally drain; the exit status is the verdict."""
    from trainwarden.errors import ConfigError  # noqa: PLC0415 - lazy

    try:
        options = options_from_args(args)
    except ConfigError as exc:
        print(f"trainwarden: {exc}", file=sys.stderr)
        return EX_CONFIG
    return preflight_main(options, as_json=args.json, record=not args.no_record, drain=args.drain)


def preflight_main(
    options: PreflightOptions, *, as_json: bool, record: bool, drain: bool, out: TextIO | None = None
) -> int:
    """Run the preflight with `options`, report to `out` (stdout); 0 healthy, 1 not (reasons on stderr)."""
    from trainwarden.preflight.runner import run_preflight  # noqa: PLC0415 - lazy

    logger = logging.getLogger("trainwarden")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # the report says it all; no collector logs
    try:
        report = run_preflight(options)
    finally:
        logger.setLevel(level)
    document = report.as_dict()
    out = sys.stdout if out is None else out
    if as_json:
        print(json.dumps(document, indent=2, sort_keys=True), file=out)
    else:
        for check in report.checks:
            print(f"preflight {check.line()}" if out is sys.stderr else check.line(), file=out)
    if record:
        _record(options, document)
    if report.healthy:
        return 0
    reason = "; ".join(f"{c.check}: {c.reason}" for c in report.failed)
    print(f"trainwarden preflight: node unhealthy: {reason}", file=sys.stderr)
    if drain:
        _drain(options.node_name, reason)
    return EX_UNHEALTHY


def _record(options: PreflightOptions, document: dict[str, Any]) -> None:
    """Result file and journal row; a state dir we cannot write never changes the verdict."""
    from trainwarden.errors import TrainwardenError  # noqa: PLC0415 - lazy
    from trainwarden.preflight.record import journal_run, write_result  # noqa: PLC0415

    try:
        write_result(options.state_dir, document)
        journal_run(options.state_dir, document)
    except (OSError, TrainwardenError) as exc:
        print(f"trainwarden preflight: result not recorded in {options.state_dir}: {exc}", file=sys.stderr)


def _drain(node: str, reason: str) -> None:
    """Drain through the Slurm backend (argv only, reason sanitised, `trainwarden:` prefix).

    A node already drained, by anyone, is left as it is: an admin's reason is theirs, and a
    health check repeating every few minutes must not rewrite trainwarden's own.
    """
    from trainwarden.backends.slurm import Scontrol, SlurmError  # noqa: PLC0415 - lazy

    scontrol = Scontrol()
    try:
        state = scontrol.node(node)
        if state is not None and state.drained:
            print(f"trainwarden preflight: {node} is already drained ({state.reason})", file=sys.stderr)
            return
        scontrol.drain(node, f"preflight {reason}")
    except SlurmError as exc:
        print(f"trainwarden preflight: could not drain {node}: {exc}", file=sys.stderr)
    else:
        print(f"trainwarden preflight: drained {node}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m trainwarden.daemon.preflight_cli`, the same as `trainwarden preflight`."""
    parser = argparse.ArgumentParser(prog="trainwarden preflight")
    add_preflight_arguments(parser)
    return run_preflight_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
