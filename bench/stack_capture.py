"""What capturing a hung rank's stacks costs, and whether a stopped rank stays stopped.

Measures, in one run and on one machine, the median wall time of one capture of a real Python
process that counts its steps into a file:
  - running rank: `py-spy dump` (pauses it with ptrace, then resumes), and the faulthandler path
    (SIGUSR2 + reading the stack file until it has not grown for `DUMP_SETTLE_SECONDS`): the baseline;
  - SIGSTOPped rank: `py-spy dump --nonblocking` (memory reads only) and the /proc kernel view;
and, for the stopped rank, how many steps it took during all its captures (must be 0).

Usage: .venv/bin/python bench/stack_capture.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from trainwarden.commands import CommandRunner
from trainwarden.stacks import default_py_spy, faulthandler_dump, kernel_view, py_spy_dump

RANK = """
import sys, time
from pathlib import Path
from trainwarden.client.stackdump import install_stack_dump
path = install_stack_dump("bench", 0)
counter = Path(sys.argv[1])
step = 0
while True:
    step += 1
    counter.write_text(str(step))
    if step == 1:
        print(path, flush=True)
    time.sleep(0.01)
"""


def _median(fn: Callable[[], tuple[str, str]], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        text, error = fn()
        times.append(time.perf_counter() - started)
        if not text:
            raise SystemExit(f"capture failed: {error}")
    return statistics.median(times)


def main() -> None:
    """Run the captures and print one line per method."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    runner, spy = CommandRunner(), default_py_spy()
    with tempfile.TemporaryDirectory() as tmp:
        counter = Path(tmp) / "steps"
        env = {**os.environ, "TRAINWARDEN_STACK_DIR": tmp}
        proc = subprocess.Popen(
            [sys.executable, "-c", RANK, str(counter)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        stack_file = proc.stdout.readline().strip()
        try:
            results = {
                "running, faulthandler (baseline)": _median(
                    lambda: faulthandler_dump(proc.pid, stack_file, 10.0), rounds
                ),
                "running, py-spy dump": _median(lambda: py_spy_dump(proc.pid, runner, 10.0, spy), rounds),
            }
            os.kill(proc.pid, signal.SIGSTOP)
            while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
                time.sleep(0.01)
            before = int(counter.read_text() or "0")
            results["stopped, py-spy dump --nonblocking"] = _median(
                lambda: py_spy_dump(proc.pid, runner, 10.0, spy, nonblocking=True), rounds
            )
            results["stopped, /proc kernel view"] = _median(lambda: kernel_view(proc.pid), rounds)
            stepped = int(counter.read_text() or "0") - before
        finally:
            proc.kill()
            proc.wait(10)
    base = results["running, faulthandler (baseline)"]
    for name, seconds in results.items():
        print(f"{name:40s} {seconds * 1000:9.1f} ms  x{seconds / base:.3f}")
    print(f"steps the stopped rank took during {2 * rounds} captures: {stepped}")


if __name__ == "__main__":
    main()
