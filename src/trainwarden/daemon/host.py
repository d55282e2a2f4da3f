"""What the daemon's parts (detect-and-heal, the webhook) need from the daemon that runs them.

A Protocol rather than `Daemon` itself: `healing.py` and `webhook.py` import it downward, and
`app.py`, which builds them, stays the only module that knows the whole daemon (no app <-> healing
import cycle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from trainwarden.collectors.base import Collector
from trainwarden.config import Config
from trainwarden.daemon.scheduler import ExtraJob
from trainwarden.store import Store


class DaemonHost(Protocol):
    """The daemon as its parts see it: its configuration, clock and store, and where they hook in."""

    @property
    def config(self) -> Config:
        """The configuration running now."""
        ...

    @property
    def clock(self) -> Callable[[], float]:
        """The daemon's clock (seconds since the epoch)."""
        ...

    @property
    def store(self) -> Store:
        """The daemon's one store of samples."""
        ...

    @property
    def extra_jobs(self) -> list[ExtraJob]:
        """Periodic jobs the scheduler runs beside the collectors (the detect-and-heal tick)."""
        ...

    @property
    def status_sections(self) -> dict[str, Callable[[], Any]]:
        """Named sections of `GET /status`, each computed per request."""
        ...

    def current_collectors(self) -> Sequence[Collector]:
        """The collectors of the configuration running now (a reload replaces them)."""
        ...
