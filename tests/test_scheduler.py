"""The collector scheduler: a raising or hanging collector never stops the others."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable

import pytest

from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.config import CollectorOptions
from trainwarden.daemon.scheduler import CollectorScheduler, DaemonThreadPool, ExtraJob
from trainwarden.model import MetricSpec, Sample
from trainwarden.store import Store

VALUE = MetricSpec("trainwarden_test_value", "A test value.", labelnames=("who",))
FAST = CollectorOptions(interval_seconds=0.05, timeout_seconds=0.3)


class Good(Collector):
    name = "good"

    def __init__(self, options: CollectorOptions = FAST) -> None:
        super().__init__(options, CollectorContext())
        self.runs = 0

    def collect(self) -> Iterable[Sample]:
        self.runs += 1
        return [VALUE.sample(self.runs, who="good")]


class Raising(Collector):
    name = "raising"

    def __init__(self) -> None:
        super().__init__(FAST, CollectorContext())

    def collect(self) -> Iterable[Sample]:
        raise OSError("/proc/fake: No such file or directory")


class Hanging(Collector):
    """Blocks until released, then reports one sample; the first call hangs, later ones return."""

    name = "hanging"

    def __init__(self) -> None:
        super().__init__(FAST, CollectorContext())
        self.release = threading.Event()
        self.calls = 0

    def collect(self) -> Iterable[Sample]:
        self.calls += 1
        if self.calls == 1:
            self.release.wait(30)
        return [VALUE.sample(self.calls, who="hanging")]


class Garbage(Collector):
    name = "garbage"

    def __init__(self) -> None:
        super().__init__(FAST, CollectorContext())

    def collect(self) -> Iterable[Sample]:
        return ["not a sample"]  # type: ignore[list-item]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.01)


def metric(store: Store, name: str, **labels: str) -> float | None:
    return store.value(name, **labels)


@pytest.fixture
def store() -> Store:
    return Store()


def test_raising_and_hanging_collectors_do_not_stop_the_good_one(store: Store) -> None:
    """While one collector raises every run and another hangs, the good one keeps running and storing."""
    good, raising, hanging = Good(), Raising(), Hanging()
    scheduler = CollectorScheduler(store, [good, raising, hanging])
    scheduler.start()
    try:
        wait_for(
            lambda: (
                good.runs >= 10
                and (metric(store, "trainwarden_collector_timeouts_total", collector="hanging") or 0) >= 1
            )
        )
        wait_for(
            lambda: (
                (
                    metric(
                        store,
                        "trainwarden_collector_skipped_runs_total",
                        collector="hanging",
                        reason="overlap",
                    )
                    or 0
                )
                >= 1
            )
        )
        assert metric(store, "trainwarden_test_value", who="good") is not None
        assert metric(store, "trainwarden_collector_success", collector="good") == 1
        assert metric(store, "trainwarden_collector_success", collector="raising") == 0
        assert (metric(store, "trainwarden_collector_errors_total", collector="raising") or 0) >= 2
        assert metric(store, "trainwarden_collector_success", collector="hanging") == 0
        assert metric(store, "trainwarden_collector_timeouts_total", collector="hanging") == 1
        status = scheduler.status()
        assert status["good"]["state"] == "ok"
        assert status["raising"]["state"] == "failing"
        assert "No such file" in status["raising"]["last_error"]
        assert status["hanging"]["state"] == "hung"
    finally:
        hanging.release.set()
        scheduler.stop()


def test_first_round_completes_despite_a_hung_collector(store: Store) -> None:
    """Readiness does not wait forever on a hung collector: its timeout counts as its first run."""
    hanging = Hanging()
    fired: list[bool] = []
    scheduler = CollectorScheduler(store, [Good(), hanging], on_first_round=lambda: fired.append(True))
    scheduler.start()
    try:
        assert scheduler.first_round.wait(10)
        assert fired == [True]
        assert scheduler.status()["hanging"]["timeouts_total"] == 1
    finally:
        hanging.release.set()
        scheduler.stop()


def test_a_hung_run_that_finishes_late_is_discarded_and_the_next_run_recovers(store: Store) -> None:
    """Samples of a run past its timeout are dropped; the collector's next run restores success 1."""
    hanging = Hanging()
    scheduler = CollectorScheduler(store, [hanging])
    scheduler.start()
    try:
        wait_for(lambda: scheduler.status()["hanging"]["timeouts_total"] == 1)
        assert metric(store, "trainwarden_test_value", who="hanging") is None
        hanging.release.set()
        wait_for(lambda: metric(store, "trainwarden_collector_success", collector="hanging") == 1)
        # Value 1 would be the late first run; a later run (calls >= 2) stored its own value.
        assert (metric(store, "trainwarden_test_value", who="hanging") or 0) >= 2
    finally:
        hanging.release.set()
        scheduler.stop()


def test_a_failing_collector_exports_no_stale_series(store: Store) -> None:
    """When a collector that succeeded starts failing, its old series leave the store."""

    class Flaky(Good):
        name = "flaky"
        fail = False

        def collect(self) -> Iterable[Sample]:
            if self.fail:
                raise RuntimeError("source vanished")
            return super().collect()

    flaky = Flaky()
    scheduler = CollectorScheduler(store, [flaky])
    scheduler.start()
    try:
        wait_for(lambda: metric(store, "trainwarden_test_value", who="good") is not None)
        flaky.fail = True
        wait_for(lambda: metric(store, "trainwarden_collector_success", collector="flaky") == 0)
        assert metric(store, "trainwarden_test_value", who="good") is None
    finally:
        scheduler.stop()


def test_samples_that_are_not_samples_count_as_an_error(store: Store) -> None:
    """A collector returning garbage is a failed run with a clear error, not a crash."""
    scheduler = CollectorScheduler(store, [Garbage()])
    scheduler.start()
    try:
        wait_for(lambda: (metric(store, "trainwarden_collector_errors_total", collector="garbage") or 0) >= 1)
        assert scheduler.status()["garbage"]["last_error"].startswith("AttributeError")
        assert metric(store, "trainwarden_collector_success", collector="garbage") == 0
    finally:
        scheduler.stop()


def test_repeated_failures_are_logged_once_per_period(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """Many failures within the log period produce a single warning, not one per run."""
    raising = Raising()
    scheduler = CollectorScheduler(store, [raising], clock=lambda: 1000.0)
    with caplog.at_level(logging.WARNING, logger="trainwarden.daemon.scheduler"):
        scheduler.start()
        try:
            wait_for(
                lambda: (metric(store, "trainwarden_collector_errors_total", collector="raising") or 0) >= 5
            )
        finally:
            scheduler.stop()
    lines = [r for r in caplog.records if "collector raising failed" in r.getMessage()]
    assert len(lines) == 1
    assert "No such file" in lines[0].getMessage()


def test_unavailable_collectors_report_success_zero_and_do_not_block_readiness(store: Store) -> None:
    """A collector whose source is missing is reported as unavailable with success 0."""
    scheduler = CollectorScheduler(
        store, [Good()], unavailable={"nvml": "unavailable: libnvidia-ml.so.1 not found"}
    )
    scheduler.start()
    try:
        assert scheduler.first_round.wait(10)
        assert metric(store, "trainwarden_collector_success", collector="nvml") == 0
        assert scheduler.status()["nvml"]["state"] == "unavailable"
        assert "libnvidia-ml" in scheduler.status()["nvml"]["last_error"]
    finally:
        scheduler.stop()


def test_extra_jobs_run_periodically_and_their_errors_are_contained(store: Store) -> None:
    """A periodic non-collector job runs on the same scheduler and raising does not stop it."""
    calls: list[int] = []

    def job() -> None:
        calls.append(1)
        raise ValueError("boom")

    scheduler = CollectorScheduler(store, [Good()], extra_jobs=[ExtraJob("ping", job, 0.05)])
    scheduler.start()
    try:
        wait_for(lambda: len(calls) >= 3)
    finally:
        scheduler.stop()


def test_a_hung_worker_thread_does_not_keep_the_process_alive() -> None:
    """The pool's threads are daemon threads, so a collector stuck forever cannot block exit."""
    code = textwrap.dedent(
        """
        import threading
        from trainwarden.daemon.scheduler import DaemonThreadPool
        pool = DaemonThreadPool(2)
        pool.submit(threading.Event().wait)
        pool.shutdown(wait=True, timeout=0.2)
        print("exiting")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "exiting" in result.stdout


def test_pool_futures_carry_results_and_exceptions() -> None:
    """The daemon-thread pool hands results and exceptions back through its futures."""
    pool = DaemonThreadPool(1)
    try:
        assert pool.submit(lambda x: x * 2, 21).result(5) == 42
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(5)
    finally:
        pool.shutdown()
