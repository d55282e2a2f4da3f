"""The stall rule leaves a rank that said goodbye alone (a finished job tearing down is not hung)."""

from __future__ import annotations

from training_series import TrainingFeed, steady
from trainwarden.collectors.training import EXITED_CLEANLY
from trainwarden.rules.base import RuleView
from trainwarden.rules.stall import StallOptions, StallRule
from trainwarden.store import Store


def test_stall_ignores_a_rank_that_said_goodbye() -> None:
    """Two ranks silent past their learned timeout: the one that sent a bye (still alive, tearing
    down torch) is not stalled, the other one is."""
    store = Store(window_seconds=3600)
    feed = TrainingFeed(store)
    last = steady(feed, ranks=2, start=0.0, count=40, seconds=1.0)
    feed.set(EXITED_CLEANLY, 1.0, last + 0.5, job="toy", rank="0")
    found = StallRule(StallOptions(floor_seconds=2.0)).evaluate(RuleView(store), last + 30.0)
    assert [f.subject["rank"] for f in found] == ["1"]
