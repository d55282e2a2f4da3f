"""Stack capture from real processes (faulthandler through the client's stack file) and the NCCL
flight-recorder pipe (a real FIFO; NCCL itself cannot run here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from trainwarden.backends.base import RankProcess
from trainwarden.commands import CommandRunner
from trainwarden.stacks import capture_stacks, faulthandler_dump, trigger_flight_recorder

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


def test_faulthandler_dump_of_a_stopped_process_and_it_stays_stopped(
    rank: tuple[subprocess.Popen[str], Path],
) -> None:
    """A SIGSTOPped rank's stacks are read via SIGUSR2 + SIGCONT, and the rank is stopped again after."""
    proc, path = rank
    assert path.parent.name == "stacks"
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_status(proc.pid, psutil.STATUS_STOPPED)
    text, error = faulthandler_dump(proc.pid, str(path), timeout=5.0)
    assert error == ""
    assert "waiting_in_a_named_function" in text
    _wait_status(proc.pid, psutil.STATUS_STOPPED)


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
