"""The timeline's old import path; the events now live in `trainwarden.timeline`.

They moved to the bottom layer because the `supervise` restart backend emits them too, and a
backend must not import the daemon above it.
"""

from __future__ import annotations

from trainwarden.timeline import EventKind, EventSink, TimelineEvent, emit

__all__ = ["EventKind", "EventSink", "TimelineEvent", "emit"]
