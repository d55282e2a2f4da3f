"""Telling the daemon about checkpoints through a reporter, without ever failing a save for it."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class CheckpointReporter(Protocol):
    """What the manager uses of `trainwarden.client.reporter.Reporter` (any object with these)."""

    def phase(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """Context manager marking a phase."""
        ...

    def checkpoint_saved(self, step: int, path: str, seconds: float | None = None) -> Any:
        """Report a completed checkpoint (`Reporter`'s also takes `local_skipped=`, sent when it applies)."""
        ...


@contextlib.contextmanager
def checkpoint_phase(reporter: CheckpointReporter | None) -> Iterator[None]:
    """``reporter.phase("checkpoint")`` around the blocking part of a save; a reporter error is logged."""
    phase = getattr(reporter, "phase", None)
    if phase is None:
        yield
        return
    try:
        context = phase("checkpoint")
        context.__enter__()
    except Exception:
        log.exception("reporter.phase failed (ignored)")
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            context.__exit__(None, None, None)


def report_saved(
    reporter: CheckpointReporter | None,
    step: int,
    path: Path,
    seconds: float,
    local_skipped: int | None = None,
) -> None:
    """``reporter.checkpoint_saved``; a reporter error is logged, never raised.

    `local_skipped` goes only to a reporter whose `checkpoint_saved` takes it (trainwarden's
    `Reporter`); any other object with the protocol's three parameters still hears of the save.
    """
    if reporter is None:
        return
    try:
        if local_skipped is not None and _takes_local_skipped(reporter):
            reporter.checkpoint_saved(step, str(path), seconds=seconds, local_skipped=local_skipped)  # type: ignore[call-arg]
        else:
            reporter.checkpoint_saved(step, str(path), seconds=seconds)
    except Exception:
        log.exception("reporter.checkpoint_saved failed (ignored)")


def _takes_local_skipped(reporter: CheckpointReporter) -> bool:
    try:
        return "local_skipped" in inspect.signature(reporter.checkpoint_saved).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
