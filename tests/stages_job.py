"""A two-rank job without torch for the restart-stage tests: a launcher that never gives up on a rank.

`python tests/stages_job.py MARKER_DIR [--like-torchrun]` starts two ranks (this file with `--rank N`)
and waits for both, as a launcher whose ranks would wait for a dead peer forever (or, like torchrun,
exits 1 once a rank failed). On the first run (no marker)
rank 1 reports three steps and dies (`os._exit(1)`, no goodbye) while rank 0 reports three steps and
then blocks, like a rank inside a collective with a dead peer: only a daemon that kills it ends the
run. On the next run both ranks report their start-up stages and six steps and say goodbye.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from trainwarden.client.reporter import Reporter

IMPORTED_AT = time.time()
STEPS = 6
FAULT_STEP = 3


def rank_main(rank: int, *, first_run: bool) -> int:
    """One rank: start-up stages, steps, and on the first run the fault of its rank."""
    reporter = Reporter.from_env(job="stages")
    reporter.startup("imported", IMPORTED_AT)
    reporter.startup("rendezvous")
    reporter.startup("checkpoint_loaded")
    start = FAULT_STEP - 1 if not first_run else 0  # the "checkpoint" of the resumed run
    for step in range(start, STEPS):
        if first_run and step == FAULT_STEP:
            reporter.flush(timeout=30.0)  # every step record is in the daemon before the fault
            if rank == 1:
                os._exit(1)
            print(f"BLOCKED {os.getpid()}", flush=True)
            while True:  # a collective whose peer is dead
                time.sleep(3600)
        reporter.step(step, loss=1.0 / (step + 1))
        print(f"STEP {step} rank {rank}", flush=True)
        time.sleep(0.05)
    reporter.close()
    return 0


def launcher(marker_dir: Path, *, like_torchrun: bool) -> int:
    """Start both ranks and wait for each, whatever happens to the other.

    `like_torchrun`: as torchrun's agent does, once a rank failed stop the others and exit 1.
    """
    marker_dir.mkdir(parents=True, exist_ok=True)
    marker = marker_dir / "ran"
    first_run = not marker.exists()  # decided once for both ranks, whichever starts first
    marker.write_text("1", encoding="utf-8")
    ranks = [
        subprocess.Popen(  # this test file itself, no shell
            [sys.executable, __file__, str(marker_dir), "--rank", str(rank), *(["--first-run"] * first_run)],
            env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"},
        )
        for rank in (0, 1)
    ]
    if like_torchrun:
        while all(proc.poll() in {None, 0} for proc in ranks) and any(p.poll() is None for p in ranks):
            time.sleep(0.2)  # torchrun's monitor interval
        if any(proc.poll() not in {None, 0} for proc in ranks):
            for proc in ranks:
                proc.kill()
            return 1
    codes = [proc.wait() for proc in ranks]
    return max(codes)


if __name__ == "__main__":
    if "--rank" in sys.argv:
        sys.exit(rank_main(int(sys.argv[sys.argv.index("--rank") + 1]), first_run="--first-run" in sys.argv))
    sys.exit(launcher(Path(sys.argv[1]), like_torchrun="--like-torchrun" in sys.argv))
