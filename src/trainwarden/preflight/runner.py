"""Runs every check family under one deadline and builds the report.

Families run side by side on daemon threads: the deadline bounds the whole preflight even when
a check hangs (a dead NFS mount, a wedged driver), and a family that has not finished by then
fails with "did not finish" rather than holding the scheduler's prolog hostage.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from trainwarden.preflight import collective, daemon_check, gpu, kernel_log, links, volume
from trainwarden.preflight.model import Check, CheckResult, PreflightOptions, Status


@dataclass(frozen=True, slots=True)
class Family:
    """A check function and the names of the checks it returns (known before it runs)."""

    names: tuple[str, ...]
    run: Check


FAMILIES: tuple[Family, ...] = (
    Family(gpu.CHECKS, gpu.check_gpus),
    Family((kernel_log.XID,), kernel_log.check_kernel_xids),
    Family((links.LINKS,), links.check_links),
    Family((volume.SPACE, volume.WRITE), volume.check_volume),
    Family((daemon_check.DAEMON,), daemon_check.check_daemon),
    Family((collective.COLLECTIVE,), collective.check_collective),
)


@dataclass
class Report:
    """Every check's result and when the run happened."""

    node: str
    started_at: float
    finished_at: float
    duration_seconds: float
    timeout_seconds: float
    checks: list[CheckResult] = field(default_factory=list)
    after_job: str = ""

    @property
    def healthy(self) -> bool:
        """No check failed (skipped ones say why they could not apply)."""
        return all(c.status is not Status.FAIL for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        """The failing checks, in order."""
        return [c for c in self.checks if c.status is Status.FAIL]

    def as_dict(self) -> dict[str, Any]:
        """The `--json` document (also what the result file holds)."""
        return {
            "node": self.node,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_seconds": round(self.duration_seconds, 6),
            "timeout_seconds": self.timeout_seconds,
            "healthy": self.healthy,
            "checks": [c.as_dict() for c in self.checks],
            "after_job": self.after_job,
        }


def run_preflight(options: PreflightOptions, families: tuple[Family, ...] = FAMILIES) -> Report:
    """Run `families` concurrently; whatever is not done at the deadline fails with the reason."""
    started_at, started = time.time(), time.monotonic()
    boxes: list[list[CheckResult]] = [[] for _ in families]
    threads = []
    for family, box in zip(families, boxes, strict=True):
        thread = threading.Thread(
            target=_run_family, args=(family, options, box), name=f"preflight-{family.names[0]}", daemon=True
        )
        thread.start()
        threads.append(thread)
    deadline = started + options.timeout_seconds
    checks: list[CheckResult] = []
    for family, box, thread in zip(families, boxes, threads, strict=True):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            why = f"did not finish within the {options.timeout_seconds:g} s preflight timeout"
            checks += [CheckResult(name, Status.FAIL, why, options.timeout_seconds) for name in family.names]
        else:
            checks += box
    duration = time.monotonic() - started
    return Report(
        node=options.node_name,
        started_at=started_at,
        finished_at=started_at + duration,
        duration_seconds=duration,
        timeout_seconds=options.timeout_seconds,
        checks=checks,
        after_job=options.after_job,
    )


def _run_family(family: Family, options: PreflightOptions, box: list[CheckResult]) -> None:
    started = time.monotonic()
    try:
        box.extend(family.run(options))
    except Exception as exc:  # a check's bug says "cannot tell", which is not "healthy"
        took = time.monotonic() - started
        why = f"check raised {type(exc).__name__}: {exc}"
        box.extend(CheckResult(name, Status.FAIL, why, took) for name in family.names)
