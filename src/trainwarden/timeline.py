"""Readable timeline events of a supervised run: what `trainwarden run` and the demo print as it happens.

One small frozen record per event, handed to the caller's `on_event` callback from whichever thread
saw it (the supervisor loop, the healing tick); a callback that raises is logged, never fatal.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class EventKind(enum.StrEnum):
    """What happened."""

    CHILD_STARTED = "child_started"  # the job's process group was (re)started
    CHILD_EXITED = "child_exited"  # the job's top process exited (data: exit_code)
    FINDING_FIRED = "finding_fired"  # a rule's finding started firing
    FINDING_RESOLVED = "finding_resolved"
    ACTION_DECIDED = "action_decided"  # the policy refused, gave up, or ran in dry-run mode
    ACTION_APPLIED = "action_applied"  # a healer changed something (or found it already done)
    ACTION_FAILED = "action_failed"
    GAVE_UP = "gave_up"  # the run stops restarting (budget spent, ladder exhausted, actions disabled)


@dataclass(frozen=True)
class TimelineEvent:
    """One line of the timeline; `data` holds the numbers behind the summary."""

    kind: EventKind
    summary: str
    time: float = field(default_factory=time.time)
    job: str = ""
    rule: str = ""
    healer: str = ""
    data: Mapping[str, str | float | int | bool] = field(default_factory=dict)

    def line(self) -> str:
        """`HH:MM:SS  kind  summary`, local time, for a terminal."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time))
        return f"{stamp}  {self.kind.value:<16}  {self.summary}"


EventSink = Callable[[TimelineEvent], None]


def emit(sink: EventSink | None, event: TimelineEvent) -> None:
    """Hand `event` to `sink`; a failing sink is logged and otherwise ignored."""
    if sink is None:
        return
    try:
        sink(event)
    except Exception:
        log.exception("timeline callback failed on %s", event.kind.value)
