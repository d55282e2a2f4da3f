"""Every host read goes through here, so a test can point the daemon at a fixture tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class HostPaths:
    """Roots of the host filesystems we read (as node_exporter's --path.procfs/--path.sysfs)."""

    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    devfs: Path = Path("/dev")

    def proc(self, *parts: str) -> Path:
        """A path under procfs."""
        return self.procfs.joinpath(*parts)

    def sys(self, *parts: str) -> Path:
        """A path under sysfs."""
        return self.sysfs.joinpath(*parts)

    def dev(self, *parts: str) -> Path:
        """A path under devfs."""
        return self.devfs.joinpath(*parts)
