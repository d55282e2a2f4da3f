"""The node-local checkpoint tier on 2 real gloo ranks: crash resume, corrupted and missing local copies."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from support import free_port
from toy_launch import REPO, Proc, torchrun_command, toy_env

pytestmark = pytest.mark.slow

TRAINER = REPO / "tests" / "local_tier_trainer.py"
STEPS = 30
LOCAL_EVERY = 2
DURABLE_EVERY = 10
CRASH_AT = 17
NEWEST_DURABLE = 9  # (9 + 1) % DURABLE_EVERY == 0, and 19 is never reached before the crash


def _ranks(args: list[str], env: dict[str, str], world: int = 2) -> list[Proc]:
    """Start the trainer's ranks directly (env:// rendezvous), each with its own output."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = dict(env)
        rank_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(Proc([sys.executable, str(TRAINER), *args], rank_env))
    return procs


def _run(args: list[str], env: dict[str, str]) -> list[Proc]:
    procs = _ranks(args, env)
    for proc in procs:
        proc.wait()
    return procs


def _args(root: Path, *extra: str) -> list[str]:
    return [
        "--steps",
        str(STEPS),
        "--durable",
        str(root / "durable"),
        "--local-root",
        str(root / "local"),
        "--local-every",
        str(LOCAL_EVERY),
        "--durable-every",
        str(DURABLE_EVERY),
        "--local-when-busy",  # every due local save written: the bound below holds however slow the writes
        "wait",
        *extra,
    ]


def _resumed(procs: list[Proc]) -> list[tuple[int, str]]:
    """(step, tier) each rank said it resumed from, by rank."""
    found = []
    for proc in procs:
        match = proc.wait_for(r"^RESUMED (\d+) (\w+) (\d+)")
        found.append((int(match.group(1)), match.group(2)))
    return found


def _finish(root: Path, env: dict[str, str]) -> tuple[list[tuple[int, str]], str]:
    """Resume the run in `root` to the end; (what each rank resumed from, final digest)."""
    procs = _run([*_args(root), "--out", str(root / "final.sha256")], env)
    assert [p.popen.returncode for p in procs] == [0, 0], procs[0].output() + procs[1].output()
    return _resumed(procs), (root / "final.sha256").read_text(encoding="utf-8").strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The digest of an uninterrupted run, and the directories of a run crashed at CRASH_AT."""
    base = tmp_path_factory.mktemp("baseline")
    env = toy_env(base)
    procs = _run(["--steps", str(STEPS), "--durable", str(base / "durable"), "--durable-every", "1000",
                  "--out", str(base / "final.sha256")], env)  # fmt: skip
    assert [p.popen.returncode for p in procs] == [0, 0], procs[0].output()
    crashed = tmp_path_factory.mktemp("crashed")
    procs = _run(_args(crashed, "--crash-at", str(CRASH_AT)), env)
    assert [p.popen.returncode for p in procs] == [1, 1], procs[0].output()
    return (base / "final.sha256").read_text(encoding="utf-8").strip(), crashed


def _copy(crashed: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(crashed, root)
    return root


def test_crash_resumes_from_the_local_tier_when_the_durable_one_is_older(
    tmp_path: Path, runs: tuple[str, Path]
) -> None:
    """After a crash both ranks resume from the same local step, newer than the durable checkpoint,
    repeating fewer steps than two local intervals, and the run ends bit-identical to an uninterrupted one."""
    baseline, crashed = runs
    root = _copy(crashed, tmp_path)
    resumed, digest = _finish(root, toy_env(tmp_path))
    assert resumed[0] == resumed[1], "both ranks resume from the same step"
    step, tier = resumed[0]
    assert tier == "local"
    assert step > NEWEST_DURABLE
    assert CRASH_AT - 1 - step < 2 * LOCAL_EVERY, f"resumed at {step}, crashed at {CRASH_AT}"
    assert digest == baseline


def test_corrupted_local_tier_falls_back_to_the_durable_one(tmp_path: Path, runs: tuple[str, Path]) -> None:
    """A flipped byte in every local copy of rank 0 makes both ranks resume from the durable tier,
    and the run still ends bit-identical."""
    baseline, crashed = runs
    root = _copy(crashed, tmp_path)
    shards = sorted((root / "local" / "node0").rglob("*.distcp"))
    assert shards, "the crashed run left local copies on rank 0"
    for shard in shards:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(data)
    resumed, digest = _finish(root, toy_env(tmp_path))
    assert resumed == [(NEWEST_DURABLE, "durable")] * 2
    assert digest == baseline


def test_a_rank_without_its_local_copy_makes_every_rank_use_the_durable_tier(
    tmp_path: Path, runs: tuple[str, Path]
) -> None:
    """Rank 1's local tier wiped (another node, a cleared /dev/shm): rank 0's local copies are not
    used, both ranks resume from the durable step, and the run ends bit-identical."""
    baseline, crashed = runs
    root = _copy(crashed, tmp_path)
    assert list((root / "local" / "node0").rglob("step_*")), "rank 0 still has local copies"
    shutil.rmtree(root / "local" / "node1")
    resumed, digest = _finish(root, toy_env(tmp_path))
    assert resumed == [(NEWEST_DURABLE, "durable")] * 2
    assert digest == baseline


def test_fsdp2_sharded_state_round_trips_through_the_local_tier(tmp_path: Path) -> None:
    """Two FSDP2 ranks save their DTensor shards to the local tier alone; a freshly sharded model on
    each rank loads them back from the local tier with the full parameters equal to those saved."""
    check = REPO / "tests" / "local_tier_fsdp_check.py"
    run = Proc(torchrun_command([str(check), str(tmp_path)]), toy_env(tmp_path))
    assert run.wait() == 0, run.output()
    lines = sorted(line for line in run.lines if line.startswith("RANK "))
    assert lines == ["RANK 0 0 local True", "RANK 1 0 local True"], run.output()
