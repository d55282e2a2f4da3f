"""The toy job end to end: the daemon's control file reaches it, and its fault-injection flags work."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from toy_launch import TOY, Proc, bare_ranks, toy_env
from training_support import running_collector, wait_until
from trainwarden.client.interrupt import EXIT_CHECKPOINTED
from trainwarden.control import ClipSettings, ControlState

pytestmark = pytest.mark.slow


def test_daemon_stop_request_reaches_both_ranks_and_is_not_obeyed_twice(tmp_path: Path) -> None:
    """A stop request written by the real training collector makes both ranks report steps, save the
    same step (reported as a checkpoint record) and exit 75; the resumed job ignores the old request."""
    with running_collector(tmp_path / "rt") as collector:
        env = toy_env(tmp_path)
        env["TRAINWARDEN_SOCKET"] = str(collector.socket_path)
        env["TRAINWARDEN_CONTROL_DIR"] = str(collector.control_dir)
        ckpt = tmp_path / "ckpt"
        args = ["--job", "toyjob", "--steps", "40", "--ckpt-dir", str(ckpt), "--ckpt-every", "0"]
        ranks = bare_ranks([*args, "--step-sleep", "0.1"], env)

        def both_stepping() -> bool:
            steps = [r["step"] for r in collector.status()["ranks"] if r["job"] == "toyjob"]
            return len(steps) == 2 and all(s is not None and s >= 3 for s in steps)

        wait_until(both_stepping, timeout=60, what="both ranks to report steps")
        tight = ClipSettings(z_threshold=2.0, ema_alpha=0.97, warmup_steps=10, warmup_max_norm=1.0)
        collector.write_control("toyjob", ControlState(job="toyjob", clip=tight, stop_request="stop-1"))
        stopped = [
            int(r.wait_for(r"^STOPPED (\d+) stop requested \(request ids stop-1\)").group(1)) for r in ranks
        ]
        assert [r.wait() for r in ranks] == [EXIT_CHECKPOINTED] * 2, ranks[0].output()
        assert stopped[0] == stopped[1]
        saved = str(ckpt / f"step_{stopped[0]:010d}")
        wait_until(
            lambda: [r["last_checkpoint"] for r in collector.status()["ranks"]] == [saved, saved],
            what="checkpoint records from both ranks",
        )

        resumed = bare_ranks(args, env)
        assert int(resumed[0].wait_for(r"^RESUMED (\d+)").group(1)) == stopped[0]
        assert [r.wait() for r in resumed] == [0, 0], resumed[0].output()
        assert not any(line.startswith("STOPPED") for line in resumed[0].lines)


def _single(tmp_path: Path, *args: str) -> Proc:
    return Proc([sys.executable, str(TOY), "--steps", "12", *args], toy_env(tmp_path))


def test_fault_injection_flags(tmp_path: Path) -> None:
    """--crash-at-step exits 1 at that step, --nan-at-step makes that loss NaN without stopping the run,
    and --hang-at-step stops progress (the process stays alive until killed)."""
    crash = _single(tmp_path, "--crash-at-step", "4")
    crash.wait_for(r"^CRASH 4$")
    assert crash.wait() == 1
    assert not any(line.startswith("STEP 4 ") for line in crash.lines)

    nan = _single(tmp_path, "--nan-at-step", "5", "--out", str(tmp_path / "out"))
    assert nan.wait() == 0, nan.output()
    assert "STEP 5 loss=nan" in nan.lines

    hang = _single(tmp_path, "--hang-at-step", "3")
    hang.wait_for(r"^HANG 3$")
    assert hang.popen.poll() is None
    hang.kill_group(signal.SIGKILL)
    assert hang.wait() == -signal.SIGKILL
