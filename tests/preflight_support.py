"""A fixture node for preflight tests: host trees, a kernel log, NVML fixtures, a checkpoint dir."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from trainwarden.nvml import FIXTURE_DIR, FIXTURE_ENV
from trainwarden.paths import HostPaths
from trainwarden.preflight.model import MIB, PreflightOptions

FIXTURES = Path(__file__).parent / "fixtures"
KMSG_CAPTURE = FIXTURES / "kmsg" / "h100-incident.txt"
IB_FIXTURE = FIXTURES / "infiniband" / "ndr_4port" / "sys"
UPTIME_SECONDS = 18_200.0
"""Seconds since boot of the fixture node: the capture's XIDs (at ~18 122 s) are 80 s old."""


@dataclass
class FixtureNode:
    """One fake node on disk; `options()` points a preflight at it."""

    root: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def procfs(self) -> Path:
        return self.root / "proc"

    @property
    def sysfs(self) -> Path:
        return self.root / "sys"

    @property
    def devfs(self) -> Path:
        return self.root / "dev"

    @property
    def kmsg(self) -> Path:
        return self.devfs / "kmsg"

    @property
    def checkpoints(self) -> Path:
        return self.root / "ckpt"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def options(self, **changes: object) -> PreflightOptions:
        """Options for this node: a 1 MiB write probe, floors any disk here clears, no daemon."""
        base = PreflightOptions(
            paths=HostPaths(procfs=self.procfs, sysfs=self.sysfs, devfs=self.devfs),
            state_dir=self.state_dir,
            node_name="fixture-node",
            checkpoint_dir=self.checkpoints,
            min_free_bytes=MIB,
            write_probe_bytes=MIB,
            min_write_bytes_per_second=0.0,
            daemon_url="http://127.0.0.1:9",  # discard port: nothing answers
            daemon_timeout_seconds=0.5,
        )
        return replace(base, **changes)  # type: ignore[arg-type]

    def use_nvml(self, name: str, **gpu0: object) -> None:
        """NVML answers from shipped fixture `name`, with GPU 0's fields changed as given."""
        data = json.loads((FIXTURE_DIR / f"{name}.json").read_text())
        for key, value in gpu0.items():
            if key == "fields":
                data["gpus"][0]["fields"].update(value)
            else:
                data["gpus"][0][key] = value
        path = self.root / f"{name}-changed.json"
        path.write_text(json.dumps(data))
        self.monkeypatch.setenv(FIXTURE_ENV, str(path))

    def kernel_log(self, *lines: str) -> None:
        """Append `PRIO,SEQ,USEC,FLAGS;TEXT` records to the fixture kernel log."""
        with self.kmsg.open("a") as handle:
            handle.writelines(line + "\n" for line in lines)

    def ib_port(
        self, device: str, state: str, phys: str = "5: LinkUp", rate: str = "400 Gb/sec (4X NDR)"
    ) -> None:
        """Set one port's state, physical state and rate."""
        port = self.sysfs / "class" / "infiniband" / device / "ports" / "1"
        (port / "state").write_text(state + "\n")
        (port / "phys_state").write_text(phys + "\n")
        (port / "rate").write_text(rate + "\n")

    def link_downed(self, device: str, count: int) -> None:
        """Set one port's link_downed counter."""
        (
            self.sysfs / "class" / "infiniband" / device / "ports" / "1" / "counters" / "link_downed"
        ).write_text(f"{count}\n")


def healthy_node(root: Path, monkeypatch: pytest.MonkeyPatch) -> FixtureNode:
    """A node whose every check passes: 8 healthy H100s, clean log, 4 active NDR ports, a disk."""
    node = FixtureNode(root, monkeypatch)
    node.procfs.mkdir(parents=True)
    (node.procfs / "uptime").write_text(f"{UPTIME_SECONDS} 1000.0\n")
    node.devfs.mkdir()
    lines = KMSG_CAPTURE.read_text().splitlines()
    node.kmsg.write_text("".join(line + "\n" for line in lines if "NVRM: Xid" not in line))
    shutil.copytree(IB_FIXTURE, node.sysfs)
    node.ib_port("mlx5_3", "4: ACTIVE")
    node.checkpoints.mkdir()
    node.use_nvml("h100-sxm-8gpu")
    return node
