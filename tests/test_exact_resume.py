"""Exact resume of a real 2-rank torchrun job (gloo, DDP) through SIGKILLs and torn checkpoints."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from toy_launch import baseline_sha, final_sha, torchrun, toy_env
from trainwarden.client.checkpoint import CheckpointManager

pytestmark = pytest.mark.slow

STEPS = 40
EVERY = 4


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Parameter digest of an uninterrupted run that saves no checkpoints at all."""
    return baseline_sha(tmp_path_factory.mktemp("baseline"), STEPS)


def _newest_step(root: Path) -> int:
    return max(int(p.name.removeprefix("step_")) for p in root.glob("step_*"))


def test_sigkill_at_random_steps_resumes_bit_identical(tmp_path: Path, baseline: str) -> None:
    """A run SIGKILLed (torchrun and workers) at three random steps, resumed each time with async
    checkpoints and once past a corrupted newest checkpoint, ends bit-identical to an uninterrupted run."""
    seed = int(os.environ.get("TRAINWARDEN_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(EVERY * 2 + 1, STEPS - 2), 3))
    ckpt, env = tmp_path / "ckpt", toy_env(tmp_path)
    args = ["--steps", str(STEPS), "--ckpt-dir", str(ckpt), "--ckpt-every", str(EVERY), "--async-ckpt"]
    resumed_from: list[int] = []
    for i, kill_at in enumerate(kills):
        run = torchrun([*args, "--step-sleep", "0.05"], env)
        if i > 0:
            resumed_from.append(int(run.wait_for(r"^RESUMED (\d+)").group(1)))
        run.wait_for(rf"^STEP ({kill_at}|{kill_at + 1}|{kill_at + 2}) ")
        run.kill_group(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        if i == 1:
            # Rot the newest checkpoint: resume must detect it on every rank and use the previous one.
            newest = _newest_step(ckpt)
            shard = max(
                (ckpt / f"step_{newest:010d}" / "state").glob("*.distcp"), key=lambda p: p.stat().st_size
            )
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(data)
            corrupted = newest
    run = torchrun([*args, "--out", str(tmp_path / "out")], env)
    resumed_from.append(int(run.wait_for(r"^RESUMED (\d+)").group(1)))
    assert run.wait() == 0, run.output()
    assert resumed_from[1] < corrupted, f"seed={seed}: resumed from the corrupted step {corrupted}"
    assert final_sha(tmp_path / "out") == baseline, f"seed={seed} kills={kills} resumed_from={resumed_from}"


def test_kill_during_checkpoint_write_leaves_nothing_loadable(tmp_path: Path, baseline: str) -> None:
    """SIGKILL while a checkpoint's shards are on disk but its manifest is not leaves only the
    previous checkpoint loadable, and resuming from it still ends bit-identical."""
    ckpt, env = tmp_path / "ckpt", toy_env(tmp_path)
    args = ["--steps", str(STEPS), "--ckpt-dir", str(ckpt), "--ckpt-every", "10"]
    run = torchrun([*args, "--ckpt-write-delay", "1.5"], env)
    run.wait_for(r"CKPT_WRITING \.tmp-step_0000000019")
    run.kill_group(signal.SIGKILL)
    run.wait()
    torn = ckpt / ".tmp-step_0000000019"
    assert (torn / "state").is_dir(), "the kill should land inside the write"
    assert not (torn / "manifest.json").exists()
    assert not (ckpt / "step_0000000019").exists()
    found = CheckpointManager(ckpt).checkpoints()
    assert [p.name for p in found] == ["step_0000000009"]

    resume = torchrun([*args, "--out", str(tmp_path / "out")], env)
    assert int(resume.wait_for(r"^RESUMED (\d+)").group(1)) == 9
    assert resume.wait() == 0, resume.output()
    assert final_sha(tmp_path / "out") == baseline
    assert not torn.exists(), "the next save removes the torn temp directory"
