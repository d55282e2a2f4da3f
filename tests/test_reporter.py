"""The training-side reporter against a real daemon socket: absent, late, killed and restarted daemons."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training_support import (
    collect_into,
    read_status,
    received,
    running_collector,
    start_daemon_process,
    wait_until,
)
from trainwarden.client import Reporter, identity_from_env
from trainwarden.client.reporter import _Pending, step_frame
from trainwarden.control import ClipSettings, ControlState, write_control
from trainwarden.protocol import FrameDecoder, StepRecord, parse

pytestmark = pytest.mark.timeout(120)


def make_reporter(runtime: Path, **kwargs: object) -> Reporter:
    defaults: dict[str, object] = {
        "job": "toy",
        "socket_path": runtime / "client.sock",
        "control_dir": runtime / "control",
        "env": {"RANK": "0", "WORLD_SIZE": "1"},
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "flush_interval": 0.002,
    }
    defaults.update(kwargs)
    return Reporter(**defaults)  # type: ignore[arg-type]


def test_identity_comes_from_torchrun_and_slurm_variables() -> None:
    """torchrun's rank variables, Slurm's job id and the restart count make up the identity."""
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "SLURM_JOB_ID": "991",
    }
    ident = identity_from_env(env=env)
    assert (ident.job, ident.rank, ident.local_rank, ident.world_size, ident.restart_count) == (
        "slurm-991",
        3,
        1,
        4,
        2,
    )
    assert identity_from_env("my job/42", env={}).job == "my_job_42"
    assert identity_from_env(env={"TRAINWARDEN_JOB": "llm", "RANK": "x"}).rank == 0


def test_restart_count_is_the_largest_any_nested_launcher_reports() -> None:
    """Under `trainwarden run` around torchrun, the supervisor's count wins over the fresh agent's 0."""
    env = {"TORCHELASTIC_RESTART_COUNT": "0", "TRAINWARDEN_RESTART_COUNT": "3", "SLURM_RESTART_COUNT": "junk"}
    assert identity_from_env(env=env).restart_count == 3


@pytest.mark.parametrize("background", [True, False])
def test_daemon_absent_drops_and_counts_without_retrying_each_step(tmp_path: Path, background: bool) -> None:
    """With no daemon every record is dropped and counted, and reconnects are rate-limited by backoff."""
    reporter = make_reporter(tmp_path, background=background, backoff_initial=1.0, backoff_max=5.0)
    for i in range(2000):
        reporter.step(i, loss=1.0, grad_norm=0.5)
    reporter.flush(timeout=0.2)
    stats = reporter.stats()
    assert stats.dropped == 2000
    assert stats.connects == 0
    assert stats.connect_failures <= 3  # not one attempt per step
    assert stats.internal_errors == 0
    reporter.close()


def test_unreachable_daemon_is_one_warning_naming_the_socket_and_the_variable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose daemon is elsewhere is warned once, with the path tried and how to point it right."""
    caplog.set_level("INFO", logger="trainwarden.client.reporter")
    reporter = make_reporter(tmp_path, background=False, backoff_initial=0.001, backoff_max=0.001)
    for i in range(200):
        reporter.step(i, loss=1.0)
        time.sleep(0.001)  # past the backoff, so every step retries the connection
    assert reporter.stats().connect_failures > 10
    reporter.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "trainwarden.client.reporter"]
    assert len(messages) == 1, messages
    assert caplog.records[0].levelname == "WARNING"
    assert str(tmp_path / "client.sock") in messages[0]
    assert "TRAINWARDEN_SOCKET=<runtime-dir>/client.sock" in messages[0]


@pytest.mark.parametrize("background", [True, False])
def test_reporting_resumes_when_the_daemon_starts_later(tmp_path: Path, background: bool) -> None:
    """Steps before the daemon exists are dropped; once it listens, steps and the drop count arrive."""
    reporter = make_reporter(tmp_path, background=background)
    for i in range(50):
        reporter.step(i, loss=float(i))
    reporter.flush(timeout=0.1)
    assert reporter.dropped == 50
    with running_collector(tmp_path) as collector:
        step = 50

        def arrived() -> bool:
            nonlocal step
            reporter.step(step, loss=float(step))
            step += 1
            time.sleep(0.005)
            return collect_into(collector).value("trainwarden_train_step", job="toy", rank="0") is not None

        wait_until(arrived, what="first step to arrive")
        reporter.flush()  # the bytes are in the socket; the collector reads them on its own time

        def last_step_read() -> bool:
            return collect_into(collector).value("trainwarden_train_step", job="toy", rank="0") == step - 1

        wait_until(last_step_read, what="the last step to be read")
        store = collect_into(collector)
        assert (
            store.value("trainwarden_client_records_dropped_total", job="toy", rank="0") == reporter.dropped
        )
        assert reporter.dropped >= 50
        reporter.close()


@pytest.mark.slow
def test_training_survives_daemon_kill_and_restart(tmp_path: Path) -> None:
    """A daemon SIGKILLed and restarted mid-run: every step completes and reporting resumes."""
    status = tmp_path / "status.json"
    daemon = start_daemon_process(tmp_path, status)
    reporter = make_reporter(tmp_path)
    try:
        for step in range(600):
            reporter.step(step, loss=1.0 / (step + 1))
            time.sleep(0.002)
            if step == 150:
                wait_until(lambda: read_status(status).get("steps", {}).get("toy/0", -1) >= 100)
                daemon.send_signal(signal.SIGKILL)
                daemon.wait(timeout=10)
            if step == 300:
                daemon = start_daemon_process(tmp_path, status)
        assert reporter.flush(timeout=5.0)
        wait_until(lambda: read_status(status).get("steps", {}).get("toy/0") == 599, what="last step")
        dropped = reporter.dropped
        assert dropped > 0  # the steps sent while the daemon was down
        assert reporter.stats().connects >= 2
        assert reporter.stats().internal_errors == 0
        wait_until(lambda: read_status(status).get("dropped", {}).get("toy/0") == dropped, what="drop count")
    finally:
        reporter.close()
        daemon.kill()
        daemon.wait(timeout=10)


def test_tensor_values_on_cpu_are_reported(tmp_path: Path) -> None:
    """0-d CPU tensors (loss with grad, grad-norm) are converted and arrive as plain numbers."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path)
        weight = torch.ones(3, requires_grad=True)
        loss = (weight * 2).sum()
        reporter.step(
            1, loss=loss, grad_norm=torch.tensor(0.25), lr=torch.tensor(1e-3), samples=torch.tensor(8)
        )
        reporter.step(2, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(float("inf")))
        assert reporter.flush()
        wait_until(lambda: received(collector) == 3)
        store = collect_into(collector)
        loss_window = store.window("trainwarden_train_loss", (("job", "toy"), ("rank", "0")))
        assert loss_window[0].value == 6.0
        assert loss_window[1].value != loss_window[1].value  # NaN passed through
        assert store.value("trainwarden_train_grad_norm", job="toy", rank="0") == float("inf")
        assert store.value("trainwarden_train_learning_rate", job="toy", rank="0") == pytest.approx(1e-3)
        reporter.close()


def test_a_cpu_tensor_is_reported_as_it_was_at_the_step(tmp_path: Path) -> None:
    """A loss tensor the loop changes in place right after step() (a running sum) is reported with
    the value it had at that step, not the one it has when the sender thread encodes the record."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path)
        running = torch.tensor(1.5)
        reporter.step(1, loss=running)
        running += 100.0
        reporter.step(2, loss=running)
        assert reporter.flush()
        wait_until(lambda: received(collector) == 3)
        loss_window = collect_into(collector).window(
            "trainwarden_train_loss", (("job", "toy"), ("rank", "0"))
        )
        assert [point.value for point in loss_window] == [1.5, 101.5]
        reporter.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_never_synchronise_the_step(tmp_path: Path) -> None:
    """With CUDA sync debugging set to error, step() with GPU tensors raises nothing and values arrive."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path, background=False)
        x = torch.randn(256, 256, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(20):
                loss = (x @ x).mean() * 0 + step
                reporter.step(step, loss=loss, grad_norm=loss.abs())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        assert reporter.flush()
        assert reporter.stats().internal_errors == 0
        wait_until(lambda: received(collector) == 21)
        store = collect_into(collector)
        assert store.value("trainwarden_train_loss", job="toy", rank="0") == 19.0
        reporter.close()


def test_phase_and_checkpoint_records_reach_the_daemon(tmp_path: Path) -> None:
    """phase() marks the phase while inside it and its duration after; checkpoint_saved sets the step."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path)
        with reporter.phase("checkpoint"):
            assert reporter.flush()
            wait_until(lambda: received(collector) == 2)
            store = collect_into(collector)
            assert store.value("trainwarden_train_phase", job="toy", rank="0", phase="checkpoint") == 1
            time.sleep(0.05)
        reporter.checkpoint_saved(10, tmp_path / "ckpt-10")
        assert reporter.flush()
        wait_until(lambda: received(collector) == 4)
        store = collect_into(collector)
        assert store.value("trainwarden_train_phase", job="toy", rank="0", phase="step") == 1
        seconds = store.value("trainwarden_train_phase_seconds", job="toy", rank="0", phase="checkpoint")
        assert seconds is not None
        assert seconds >= 0.05
        assert store.value("trainwarden_train_last_checkpoint_step", job="toy", rank="0") == 10
        with pytest.raises(ValueError, match="lunch"):
            reporter.phase("lunch")
        reporter.close()


def test_step_time_excludes_a_preceding_phase(tmp_path: Path) -> None:
    """A checkpoint between two steps does not count in the next step's duration."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path)
        reporter.step(1)
        with reporter.phase("checkpoint"):
            time.sleep(0.2)
        reporter.step(2)
        assert reporter.flush()
        wait_until(lambda: received(collector) == 5)
        store = collect_into(collector)
        step_seconds = store.value("trainwarden_train_step_seconds", job="toy", rank="0")
        assert step_seconds is not None
        assert step_seconds < 0.2
        reporter.close()


def test_poll_control_follows_the_file_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    """poll_control sees a new file, ignores an unchanged one, and keeps the old state on a bad file."""
    reporter = make_reporter(tmp_path, control_interval=0.0)
    assert reporter.poll_control() == ControlState(job="toy")
    path = tmp_path / "control" / "toy.control.json"
    write_control(path, ControlState(job="toy", clip=ClipSettings(z_threshold=2.0), stop_request="s1"))
    state = reporter.poll_control()
    assert state.clip == ClipSettings(z_threshold=2.0)
    assert state.stop_request == "s1"
    for _ in range(100):
        reporter.poll_control()
    assert reporter.stats().control_reads == 1  # unchanged file: stat only
    path.write_text("{ this is not json")
    assert reporter.poll_control() == state
    assert reporter.stats().control_errors == 1
    path.unlink()
    assert reporter.poll_control() == ControlState(job="toy")
    reporter.close()


def test_forked_child_does_not_write_into_the_parents_connection(tmp_path: Path) -> None:
    """After fork the child's reporter goes quiet, so its records cannot corrupt the parent's stream."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path)
        reporter.step(1)
        assert reporter.flush()
        pid = os.fork()
        if pid == 0:  # child: try hard to send, then leave without cleanup
            for i in range(100):
                reporter.step(1000 + i)
            reporter.flush(timeout=0.2)
            os._exit(0)
        os.waitpid(pid, 0)
        reporter.step(2)
        assert reporter.flush()
        wait_until(lambda: received(collector) == 3)
        time.sleep(0.1)
        assert received(collector) == 3
        assert collector.status()["rejected"] == {}
        store = collect_into(collector)
        assert store.value("trainwarden_train_step", job="toy", rank="0") == 2
        reporter.close()


BURST_CLIENT = textwrap.dedent(
    """
    import json, sys
    from trainwarden.client import Reporter
    socket_path, rank, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    env = {"RANK": str(rank), "WORLD_SIZE": "8", "LOCAL_RANK": str(rank)}
    reporter = Reporter(job="burst", socket_path=socket_path, control_dir="/nonexistent", env=env)
    for step in range(n):
        reporter.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, samples=8.0, tokens=1024.0)
    reporter.close(timeout=30)
    stats = reporter.stats()
    print(json.dumps({"dropped": stats.dropped, "sent": stats.sent, "queued": stats.queued}))
    """
)


@pytest.mark.slow
def test_burst_of_eight_ranks_arrives_without_drops(tmp_path: Path) -> None:
    """8 processes reporting as fast as they can reach a running daemon with zero drops on both sides."""
    n = 5000
    with running_collector(tmp_path) as collector:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", BURST_CLIENT, str(collector.socket_path), str(rank), str(n)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for rank in range(8)
        ]
        results = [json.loads(p.communicate(timeout=90)[0]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert [r["dropped"] for r in results] == [0] * 8
        expected = 8 * (1 + n + 1)  # hello + steps + bye per rank
        wait_until(lambda: received(collector) == expected, what=f"{expected} records")
        store = collect_into(collector)
        for rank in range(8):
            assert store.value("trainwarden_train_step", job="burst", rank=str(rank)) == n - 1
            assert store.value("trainwarden_client_records_dropped_total", job="burst", rank=str(rank)) == 0
        assert collector.status()["rejected"] == {}


@pytest.mark.parametrize("background", [True, False])
def test_a_daemon_that_stops_reading_never_blocks_the_loop(tmp_path: Path, background: bool) -> None:
    """A socket nobody reads fills up; steps keep returning and the overflow is counted as drops."""
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(tmp_path / "client.sock"))
    stuck.listen(1)  # connections queue in the backlog; nobody ever reads
    try:
        reporter = make_reporter(tmp_path, background=background, max_queue=1000)
        for i in range(30_000):
            reporter.step(i, loss=1.0, grad_norm=0.5, lr=1e-3, samples=8.0, tokens=1024.0)
        assert not reporter.flush(timeout=0.2)
        stats = reporter.stats()
        assert stats.connects == 1
        assert stats.dropped > 0
        assert stats.internal_errors == 0
        reporter.close(timeout=0.2)
    finally:
        stuck.close()


def test_step_frame_is_strict_json_whatever_the_value_types() -> None:
    """numpy scalars, bools, NaN and negative counts encode to a frame the daemon accepts."""
    record = ("step", 3, 0.5, np.float32(1.5), math.nan, True, -4.0, np.int64(9), None)
    payload = FrameDecoder().feed(step_frame(record, 2))[0]
    json.loads(payload, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    parsed = parse(payload)
    assert isinstance(parsed, StepRecord)
    assert (parsed.step, parsed.step_seconds, parsed.loss, parsed.lr, parsed.samples, parsed.tokens) == (
        3,
        0.5,
        1.5,
        1.0,
        None,
        9.0,
    )
    assert parsed.grad_norm is not None
    assert math.isnan(parsed.grad_norm)
    assert parsed.dropped == 2


def test_nested_phases_return_to_the_enclosing_phase(tmp_path: Path) -> None:
    """Leaving a data phase inside an eval phase puts the rank back in eval, not in step."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path)
        with reporter.phase("eval"):
            with reporter.phase("data"):
                pass
            assert reporter.flush()
            wait_until(lambda: received(collector) == 5)
            store = collect_into(collector)
            assert store.value("trainwarden_train_phase", job="toy", rank="0", phase="eval") == 1
            assert (
                store.value("trainwarden_train_phase_seconds", job="toy", rank="0", phase="data") is not None
            )
        assert reporter.flush()
        wait_until(lambda: received(collector) == 6)
        assert (
            collect_into(collector).value("trainwarden_train_phase", job="toy", rank="0", phase="step") == 1
        )
        reporter.close()


class _FakeEvent:
    """Stands in for a CUDA event (no GPU here): query() says whether the copy has landed."""

    def __init__(self) -> None:
        self.done = False
        self.broken = False

    def query(self) -> bool:
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.done


def test_device_values_wait_for_their_event_without_holding_back_other_records(tmp_path: Path) -> None:
    """A step whose device copy is pending is sent once its event completes; phases are not held back."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path, background=False)
        event = _FakeEvent()
        pending = _Pending({0: torch.tensor(7.5)}, event)
        reporter._enqueue(("step", 1, 0.1, None, 0.5, None, None, None, pending))
        with reporter.phase("eval"):
            pass
        assert not reporter.flush(timeout=0.1)  # the step is still waiting on the device
        wait_until(lambda: received(collector) == 3)  # hello + eval begin/end
        event.done = True
        assert reporter.flush()
        wait_until(lambda: received(collector) == 4)
        assert collect_into(collector).value("trainwarden_train_loss", job="toy", rank="0") == 7.5
        reporter.close()


def test_a_plain_step_after_a_waiting_device_step_keeps_step_order(tmp_path: Path) -> None:
    """A float-only step queued behind a step still waiting on its device copy is not sent before it."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path, background=False)
        event = _FakeEvent()
        reporter._enqueue(
            ("step", 1, 0.1, None, None, None, None, None, _Pending({0: torch.tensor(1.0)}, event))
        )
        reporter.step(2, loss=2.0)
        assert not reporter.flush(timeout=0.1)
        assert received(collector) <= 1  # only the hello
        event.done = True
        assert reporter.flush()
        wait_until(lambda: received(collector) == 3)
        store = collect_into(collector)
        assert [p.value for p in store.window("trainwarden_train_step", (("job", "toy"), ("rank", "0")))] == [
            1,
            2,
        ]
        reporter.close()


def test_a_failing_device_event_drops_only_its_own_step(tmp_path: Path) -> None:
    """If querying the device event raises, that step is dropped and counted; later steps still flow."""
    with running_collector(tmp_path) as collector:
        reporter = make_reporter(tmp_path, background=False)
        event = _FakeEvent()
        event.broken = True
        reporter._enqueue(("step", 1, 0.1, None, None, None, None, None, _Pending({}, event)))
        reporter.step(2, loss=1.0)
        assert reporter.flush()
        wait_until(lambda: received(collector) == 2)
        stats = reporter.stats()
        assert (stats.dropped, stats.internal_errors) == (1, 1)
        assert collect_into(collector).value("trainwarden_train_step", job="toy", rank="0") == 2
        reporter.close()
