"""Stack capture from real processes (py-spy, faulthandler through the client's stack file, /proc for a
stopped rank, which is never resumed) and the NCCL flight-recorder pipe (a real FIFO; no NCCL here)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from support import wait_until
from trainwarden.backends.base import RankProcess
from trainwarden.commands import CommandRunner
from trainwarden.paths import HostPaths
from trainwarden.stacks import (
    capture_stacks,
    default_py_spy,
    faulthandler_dump,
    is_stopped,
    process_state,
    trigger_flight_recorder,
)

CHILD = """
import sys, time
from trainwarden.client.stackdump import install_stack_dump
path = install_stack_dump("job", 1)
def waiting_in_a_named_function():
    print(path, flush=True)  # only once inside, so every dump shows this frame
    while True:
        time.sleep(0.05)
waiting_in_a_named_function()
"""


@pytest.fixture
def rank(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    env = {**os.environ, "TRAINWARDEN_STACK_DIR": str(tmp_path / "stacks")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    path = Path(proc.stdout.readline().strip())
    try:
        yield proc, path
    finally:
        proc.kill()
        proc.wait(10)


def _wait_status(pid: int, wanted: str) -> None:
    deadline = time.monotonic() + 5
    while psutil.Process(pid).status() != wanted:
        assert time.monotonic() < deadline, f"pid {pid} never became {wanted}"
        time.sleep(0.01)


# A rank that counts its steps into a file, so a test can see whether it ran during a capture.
COUNTING = """
import sys, time
from pathlib import Path
from trainwarden.client.stackdump import install_stack_dump
path = install_stack_dump("job", 0)
counter = Path(sys.argv[1])
def training_step_loop():
    step = 0
    while True:
        step += 1
        counter.write_text(str(step))
        if step == 1:
            print(path, flush=True)
        time.sleep(0.01)
training_step_loop()
"""


@pytest.fixture
def counting_rank(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    env = {**os.environ, "TRAINWARDEN_STACK_DIR": str(tmp_path / "stacks")}
    counter = tmp_path / "steps"
    proc = subprocess.Popen(
        [sys.executable, "-c", COUNTING, str(counter)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    path = Path(proc.stdout.readline().strip())
    try:
        yield proc, path, counter
    finally:
        proc.kill()
        proc.wait(10)


def _steps(counter: Path) -> int:
    return int(counter.read_text() or "0")


def _capture_while_stopped(proc: subprocess.Popen[str], stack_file: Path, counter: Path, py_spy: str) -> str:
    """Stop the rank, capture, check it stayed stopped without a step; resume it and see it count again."""
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_status(proc.pid, psutil.STATUS_STOPPED)
    before = _steps(counter)
    captures = capture_stacks(
        [RankProcess("job", 0, 0, proc.pid, str(stack_file))], timeout=10.0, py_spy=py_spy
    )
    assert psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
    assert _steps(counter) == before
    assert stack_file.read_text() == ""  # no SIGUSR2 was queued or delivered
    os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: _steps(counter) > before, what="the resumed rank to step again")
    [capture] = captures
    assert capture.stopped
    return capture.render()


@pytest.mark.skipif(
    shutil.which(default_py_spy()) is None, reason="py-spy is not installed (the stacks extra)"
)
def test_py_spy_reads_a_stopped_rank_without_resuming_it(
    counting_rank: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    """py-spy (non-blocking) reads a SIGSTOPped rank's Python stack; it stays stopped and takes no step."""
    proc, stack_file, counter = counting_rank
    text = _capture_while_stopped(proc, stack_file, counter, default_py_spy())
    assert "via py-spy" in text
    assert "training_step_loop" in text
    assert "left stopped" in text


def test_a_stopped_rank_without_py_spy_gets_the_kernel_view_and_stays_stopped(
    counting_rank: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    """Without py-spy a SIGSTOPped rank is not signalled: the bundle holds /proc's view and says why."""
    proc, stack_file, counter = counting_rank
    text = _capture_while_stopped(proc, stack_file, counter, "/nonexistent/py-spy")
    assert "via kernel" in text
    assert f"Thread {proc.pid} " in text
    assert "(stopped)" in text
    assert "no Python stacks" in text
    assert "left stopped" in text


def test_faulthandler_refuses_a_stopped_rank(counting_rank: tuple[subprocess.Popen[str], Path, Path]) -> None:
    """faulthandler_dump on a stopped rank says why it cannot, instead of resuming it."""
    proc, stack_file, counter = counting_rank
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_status(proc.pid, psutil.STATUS_STOPPED)
    before = _steps(counter)
    text, error = faulthandler_dump(proc.pid, str(stack_file), timeout=5.0)
    assert (text, "stopped" in error) == ("", True)
    assert psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
    assert _steps(counter) == before


def test_process_state_reads_a_comm_with_spaces_and_parentheses(tmp_path: Path) -> None:
    """The state letter is read after the last ')' of /proc/PID/stat, whatever the command name holds."""
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text("7 (a (b) c) T 1 7 7 0 -1\n")
    assert process_state(7, HostPaths(procfs=tmp_path)) == "T"
    assert is_stopped(7, HostPaths(procfs=tmp_path))
    assert process_state(8, HostPaths(procfs=tmp_path)) == ""


def test_second_capture_reads_only_the_new_dump(rank: tuple[subprocess.Popen[str], Path]) -> None:
    """Dumps append to one file; each capture returns only what its own signal produced."""
    proc, path = rank
    first, _ = faulthandler_dump(proc.pid, str(path), timeout=5.0)
    second, _ = faulthandler_dump(proc.pid, str(path), timeout=5.0)
    assert first.count("waiting_in_a_named_function") == 1
    assert second.count("waiting_in_a_named_function") == 1
    assert path.read_text().count("waiting_in_a_named_function") == 2


def test_capture_falls_back_from_a_missing_py_spy_and_names_why(
    rank: tuple[subprocess.Popen[str], Path],
) -> None:
    """Without py-spy the capture uses faulthandler; a rank without stack file yields 'none' and why."""
    proc, path = rank
    captures = capture_stacks(
        [RankProcess("job", 1, 1, proc.pid, str(path)), RankProcess("job", 0, 0, proc.pid, "")],
        timeout=5.0,
        runner=CommandRunner(),
        py_spy="/nonexistent/py-spy",
    )
    assert [(c.rank, c.method) for c in captures] == [(0, "none"), (1, "faulthandler")]
    assert "not installed" in captures[0].error
    assert "no stack file" in captures[0].error
    assert "waiting_in_a_named_function" in captures[1].render()


def test_flight_recorder_writes_to_each_ranks_fifo(tmp_path: Path) -> None:
    """A FIFO with a reader gets the dump request; a missing FIFO and one without reader say why."""
    prefix = str(tmp_path / "nccl_trace_")
    os.mkfifo(f"{prefix}0.pipe")
    os.mkfifo(f"{prefix}2.pipe")
    reader = os.open(f"{prefix}0.pipe", os.O_RDONLY | os.O_NONBLOCK)  # what the rank's watchdog does
    try:
        results = trigger_flight_recorder(prefix, [0, 1, 2])
        assert results[0] == "ok"
        assert os.read(reader, 16) == b"1\n"
    finally:
        os.close(reader)
    assert "does not exist" in results[1]
    assert "no reader" in results[2]


def test_flight_recorder_refuses_a_regular_file(tmp_path: Path) -> None:
    """A regular file at the pipe path is not written to (it would never be read by NCCL)."""
    prefix = str(tmp_path / "trace_")
    Path(f"{prefix}0.pipe").write_text("", encoding="utf-8")
    assert "not a FIFO" in trigger_flight_recorder(prefix, [0])[0]
    assert Path(f"{prefix}0.pipe").read_text(encoding="utf-8") == ""
