"""One base exception so callers can catch everything trainwarden raises on purpose."""

from __future__ import annotations

from dataclasses import dataclass


class TrainwardenError(Exception):
    """Base of every error trainwarden raises deliberately."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One bad key: where it is and why it is rejected."""

    section: str
    key: str
    why: str

    def __str__(self) -> str:
        where = f"[{self.section}] {self.key}" if self.section else self.key
        return f"{where}: {self.why}" if where else self.why


class ConfigError(TrainwardenError):
    """A configuration that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{lines}")


class CollectorError(TrainwardenError):
    """A collector could not read its source; counted as a failed collection, never fatal."""


class CollectorUnavailableError(CollectorError):
    """The source does not exist on this host (no NVML, no PSI, no InfiniBand): disable quietly."""
