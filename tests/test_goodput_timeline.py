"""Goodput accounting checked against scripted timelines, to the exact second."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trainwarden.goodput_timeline import STATES, GoodputTimeline, JobGoodput, Sender, Totals

LEAD = Sender("job", 0, 100)


def only(timeline: GoodputTimeline, now: float) -> JobGoodput:
    (job,) = timeline.snapshot(now)
    return job


def seconds(job: JobGoodput) -> dict[str, float]:
    return {k: v for k, v in job.seconds.items() if v}


def test_healthy_run_is_productive_except_init_and_checkpoint() -> None:
    """A run with no fault is productive but for its start-up, its checkpoint and its goodbye."""
    tl = GoodputTimeline()
    tl.hello(100.0, LEAD)
    tl.phase(100.5, LEAD, "init", "begin")
    tl.phase(102.0, LEAD, "init", "end")
    tl.step(103.0, LEAD, 1)
    tl.step(104.0, LEAD, 2)
    tl.phase(104.5, LEAD, "checkpoint", "begin")
    tl.phase(105.5, LEAD, "checkpoint", "end")
    tl.step(106.0, LEAD, 3)
    tl.phase(106.25, LEAD, "data", "begin")  # data loading is part of the step
    tl.phase(106.5, LEAD, "data", "end")
    tl.step(107.0, LEAD, 4)
    tl.bye(107.5, LEAD)
    assert only(tl, 108.0).open_seconds == 0.5  # held: a restart may still claim it
    tl.settle(200.0)
    job = only(tl, 200.0)
    assert seconds(job) == {"initialising": 3.5, "productive": 3.0, "checkpointing": 1.0}
    assert job.wall_seconds == 7.5  # the goodbye stops the clock
    assert job.restarts == {}
    assert job.steps_repeated == 0
    assert job.ratio == 3.0 / 7.5


def test_crash_restart_splits_detecting_restarting_and_repeated() -> None:
    """A crash: last step to the finding is detecting, the finding to the first new step restarting."""
    tl = GoodputTimeline()
    tl.hello(0.0, LEAD)
    for step in (1, 2, 3):
        tl.step(float(step), LEAD, step)
    tl.restart(3.75, "job", "process_exit", detected_at=3.5)
    new = Sender("job", 0, 101)
    tl.hello(5.0, new)
    tl.phase(5.5, new, "init", "begin")  # the resumed process's start-up is part of the restart
    tl.step(6.0, new, 2)
    tl.step(7.0, new, 3)
    tl.step(8.0, new, 4)
    job = only(tl, 8.0)
    assert seconds(job) == {
        "initialising": 1.0,
        "productive": 3.0,
        "detecting": 0.5,
        "restarting": 2.5,
        "repeated": 1.0,
    }
    assert job.steps_repeated == 2
    assert job.restarts == {"process_exit": 1}
    assert job.wall_seconds == 8.0
    assert job.high_water == 4


def test_hang_in_eval_new_process_before_the_restart_is_one_restart() -> None:
    """A hello of the new process arriving before the daemon's restart record counts one restart."""
    tl = GoodputTimeline()
    tl.hello(0.0, LEAD)
    tl.step(1.0, LEAD, 1)
    tl.phase(1.5, LEAD, "eval", "begin")
    tl.phase(3.5, LEAD, "eval", "end")
    tl.step(4.0, LEAD, 2)  # the eval is carved out of this step interval: 0.5 + 0.5 productive
    # hangs after step 2; the stall finding at 9.0, the restart recorded once the healer returns
    new = Sender("job", 0, 200)
    tl.hello(9.5, new)
    tl.restart(10.0, "job", "stall", detected_at=9.0)
    tl.step(12.0, new, 2)
    job = only(tl, 12.0)
    assert seconds(job) == {
        "initialising": 1.0,
        "evaluating": 2.0,
        "productive": 1.0,
        "detecting": 5.0,
        "restarting": 3.0,
    }
    assert job.restarts == {"stall": 1}
    assert job.steps_repeated == 1


def test_a_goodbye_overridden_by_a_restart_is_the_faults_time() -> None:
    """A rank told to stop because its peer crashed says goodbye; the restart after it claims that time."""
    tl = GoodputTimeline()
    tl.hello(0.0, LEAD)
    tl.step(1.0, LEAD, 1)
    tl.step(2.0, LEAD, 2)
    tl.bye(3.0, LEAD)
    tl.restart(6.0, "job", "process_exit", detected_at=5.0)
    tl.settle(1000.0)  # nothing held any more
    new = Sender("job", 0, 101)
    tl.hello(7.0, new)
    tl.step(8.0, new, 3)
    job = only(tl, 8.0)
    assert seconds(job) == {"initialising": 1.0, "productive": 1.0, "detecting": 3.0, "restarting": 3.0}
    assert job.wall_seconds == 8.0


def test_unexplained_new_process_is_an_external_restart_from_its_last_sign_of_life() -> None:
    """A new pid that no restart explains counts as `external`; its wait starts at the last record."""
    tl = GoodputTimeline()
    tl.hello(0.0, LEAD)
    tl.step(1.0, LEAD, 1)
    tl.phase(1.5, LEAD, "checkpoint", "begin")
    tl.phase(2.0, LEAD, "checkpoint", "end")  # the old process's last sign of life
    tl.hello(6.0, Sender("job", 0, 300))
    tl.step(7.0, Sender("job", 0, 300), 2)
    job = only(tl, 7.0)
    assert seconds(job) == {"initialising": 1.0, "checkpointing": 0.5, "detecting": 0.5, "restarting": 5.0}
    assert job.restarts == {"external": 1}
    assert job.steps_repeated == 0


def test_other_ranks_and_old_processes_do_not_count() -> None:
    """Only the lowest rank's current process moves the clock; a second restart before a step counts."""
    tl = GoodputTimeline()
    tl.hello(0.0, Sender("job", 1, 51))
    tl.hello(0.0, LEAD)
    tl.step(1.0, LEAD, 1)
    tl.step(1.5, Sender("job", 1, 51), 1)
    tl.step(2.0, LEAD, 2)
    tl.restart(3.0, "job", "nonfinite_loss")
    tl.step(3.5, LEAD, 3)  # the old process, late: ignored
    tl.restart(5.0, "job", "restart_unanswered")
    new = Sender("job", 0, 102)
    tl.hello(6.0, new)
    tl.step(7.0, new, 3)
    job = only(tl, 7.0)
    assert job.restarts == {"nonfinite_loss": 1, "restart_unanswered": 1}
    assert seconds(job) == {"initialising": 1.0, "productive": 1.0, "detecting": 1.0, "restarting": 4.0}
    assert job.steps_repeated == 0  # step 3 was never counted before


def test_a_restart_that_brings_other_ranks_to_this_node_is_followed_through_them() -> None:
    """After a restart the node may host other ranks: the lowest one that says hello ends the restart."""
    tl = GoodputTimeline()
    tl.hello(0.0, LEAD)
    tl.step(1.0, LEAD, 1)
    tl.hello(1.5, Sender("job", 4, 400))  # a higher rank while the lead lives: not followed
    tl.step(2.0, LEAD, 2)
    tl.restart(3.0, "job", "process_gone")
    moved = Sender("job", 4, 401)  # the job came back with ranks 4-7 here
    tl.hello(5.0, moved)
    tl.step(6.0, moved, 3)
    tl.step(7.0, moved, 4)
    job = only(tl, 7.0)
    assert seconds(job) == {"initialising": 1.0, "productive": 2.0, "restarting": 3.0, "detecting": 1.0}
    assert job.mode == "running"


def test_restored_totals_continue_after_a_daemon_restart() -> None:
    """After a daemon restart the same process reconnects: steps at or below the high water are repeats."""
    totals = Totals(high_water=10, lead_rank=0, lead_pid=100, steps_repeated=1, restarts={"stall": 1})
    totals.seconds["productive"] = 10.0
    tl = GoodputTimeline()
    tl.restore("job", totals)
    assert only(tl, 50.0).wall_seconds == 10.0  # nothing open while no process is known
    tl.hello(60.0, LEAD)
    tl.step(61.0, LEAD, 11)
    tl.step(62.0, LEAD, 12)
    job = only(tl, 62.5)
    assert job.seconds["productive"] == 12.0
    assert job.open_seconds == 0.5
    assert job.restarts == {"stall": 1}


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["hello", "step", "phase", "bye", "restart"]),
        st.floats(0.0, 5.0),
        st.integers(0, 2),  # rank
        st.integers(0, 2),  # pid choice
        st.integers(0, 20),  # step
        st.sampled_from(["init", "data", "eval", "checkpoint"]),
        st.booleans(),
    ),
    max_size=60,
)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(EVENTS)
def test_any_event_order_accounts_no_more_than_the_wall_clock(events: list[tuple]) -> None:  # type: ignore[type-arg]
    """Whatever the records, counters never fall and never sum to more than the elapsed time."""
    tl = GoodputTimeline()
    t = 0.0
    previous = dict.fromkeys(STATES, 0.0)
    for kind, gap, rank, pid, step, phase, begin in events:
        t += gap
        sender = Sender("job", rank, 100 + pid)
        if kind == "hello":
            tl.hello(t, sender)
        elif kind == "step":
            tl.step(t, sender, step)
        elif kind == "phase":
            tl.phase(t, sender, phase, "begin" if begin else "end")
        elif kind == "bye":
            tl.bye(t, sender)
        else:
            tl.restart(t, "job", "stall", detected_at=t - gap / 2)
        for job in tl.snapshot(t):
            assert job.wall_seconds <= t + 1e-9
            for state in STATES:
                assert job.seconds[state] >= previous[state]
                previous[state] = job.seconds[state]
