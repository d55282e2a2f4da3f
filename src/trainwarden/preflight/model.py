"""What a preflight check returns, and the settings every check reads."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trainwarden.commands import JOB_ID
from trainwarden.paths import HostPaths


class Status(enum.StrEnum):
    """A check passed, failed (the node is not fit), or could not apply here (with the reason)."""

    PASS = "pass"  # noqa: S105 - a result, not a password
    FAIL = "fail"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the preflight report; `detail` holds the numbers behind the verdict."""

    check: str
    status: Status
    reason: str
    duration_seconds: float = 0.0
    detail: Mapping[str, float | str] = field(default_factory=dict)

    def line(self) -> str:
        """`PASS  gpu_nvml: 8 GPUs answer NVML`, as printed one per check."""
        return f"{self.status.value.upper():<7} {self.check}: {self.reason}"

    def as_dict(self) -> dict[str, object]:
        """JSON-able form (`--json`, the result file)."""
        return {
            "check": self.check,
            "status": self.status.value,
            "reason": self.reason,
            "duration_seconds": round(self.duration_seconds, 6),
            "detail": dict(self.detail),
        }


MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class PreflightOptions:
    """Thresholds and places a preflight looks at; every field has a safe default.

    `expect_gpus`: fail unless at least this many GPUs answer (0: whatever NVML lists, and a node
    without NVML is skipped rather than failed). `checkpoint_dir`: the volume the job checkpoints
    to (None: the volume checks are skipped). `xid_lookback_seconds`: how far back the kernel log
    counts. `infiniband_min_rate_gbps`: 0 accepts any rate an active port negotiated.
    """

    paths: HostPaths = field(default_factory=HostPaths)
    state_dir: Path = Path("/var/lib/trainwarden")
    node_name: str = ""
    timeout_seconds: float = 30.0
    expect_gpus: int = 0
    checkpoint_dir: Path | None = None
    min_free_bytes: int = 10 * GIB
    write_probe_bytes: int = 16 * MIB
    min_write_bytes_per_second: float = 20.0 * MIB
    xid_lookback_seconds: float = 3600.0
    infiniband_min_rate_gbps: float = 0.0
    daemon_url: str = "http://127.0.0.1:9871"
    daemon_timeout_seconds: float = 2.0
    collective: bool = False
    collective_ranks: int = 2
    collective_bytes: int = 4 * MIB
    min_collective_bytes_per_second: float = 50.0 * MIB
    after_job: str = ""
    """The job that just ended on this node (a Slurm Epilog), recorded with the result."""

    def problems(self) -> list[tuple[str, str]]:
        """Every out-of-range setting, with its (command-line) name."""
        rules: tuple[tuple[str, bool, str], ...] = (
            ("timeout", 0 < self.timeout_seconds <= 3600, "must be > 0 and <= 3600 seconds"),
            ("expect-gpus", self.expect_gpus >= 0, "must be >= 0"),
            ("min-free-gib", self.min_free_bytes >= 0, "must be >= 0"),
            ("write-probe-mib", MIB <= self.write_probe_bytes <= 4 * GIB, "must be between 1 and 4096"),
            ("min-write-mib-per-second", self.min_write_bytes_per_second >= 0, "must be >= 0"),
            ("xid-lookback", self.xid_lookback_seconds > 0, "must be > 0 seconds"),
            ("infiniband-min-rate-gbps", self.infiniband_min_rate_gbps >= 0, "must be >= 0"),
            ("collective-ranks", 2 <= self.collective_ranks <= 64, "must be between 2 and 64"),
            ("collective-mib", 4 <= self.collective_bytes <= 4 * GIB, "must be between 4 bytes and 4096 MiB"),
            ("min-collective-mib-per-second", self.min_collective_bytes_per_second >= 0, "must be >= 0"),
            (
                "after-job",
                not self.after_job or bool(JOB_ID.match(self.after_job)),
                f"must match {JOB_ID.pattern}",
            ),
        )
        return [(name, why) for name, ok, why in rules if not ok]


Check = Callable[[PreflightOptions], list[CheckResult]]
"""A check family: runs its collector once and returns one result per check it owns."""
