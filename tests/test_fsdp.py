"""FSDP2 (`fully_shard`, DTensor) on 2 gloo ranks on CPU: the clipper's global norm, sharded checkpoints,
and the healing paths under `trainwarden run` with the FSDP2 trainer (tests/fsdp_trainer.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from heal_support import taken
from toy_launch import Proc, torchrun_command, toy_env
from user_support import final, make_data, metrics_by_rank, supervised

pytestmark = [pytest.mark.slow]

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "fsdp_checks.py"
TRAINER = HERE / "fsdp_trainer.py"


def checks(tmp: Path, names: list[str], nproc: int = 2) -> None:
    """Run fsdp_checks.py on `nproc` gloo ranks; every rank writes `<check>.rank<r>.json` into tmp/out."""
    env = toy_env(tmp)
    proc = Proc(
        torchrun_command(
            [str(CHECKS), *names, "--out", str(tmp / "out"), "--ckpt", str(tmp / "ckpt")], nproc
        ),
        env,
    )
    assert proc.wait(240) == 0, proc.output()


def result(tmp: Path, check: str, rank: int) -> Any:
    return json.loads((tmp / "out" / f"{check}.rank{rank}.json").read_text(encoding="utf-8"))


def trainer_args(data: Path, steps: int, *extra: str, ckpt: Path | None = None, out: Path) -> list[str]:
    args = [str(TRAINER), "--data", str(data), "--steps", str(steps), "--out", str(out), *extra]
    return args if ckpt is None else [*args, "--ckpt-dir", str(ckpt)]


def reference(tmp: Path, data: Path, steps: int) -> dict[str, object]:
    """An uninterrupted FSDP2 run without the daemon (no checkpoints): the final parameters to match."""
    proc = Proc(torchrun_command(trainer_args(data, steps, out=tmp / "out")), toy_env(tmp))
    assert proc.wait(240) == 0, proc.output()
    return final(tmp / "out")


@pytest.mark.timeout(300)
def test_sharded_norm_equals_the_whole_models_and_every_rank_clips_and_skips_alike(tmp_path: Path) -> None:
    """With FSDP2 shards the clipper's norm is the whole model's norm (one scalar all-reduce), and both
    ranks clip and skip exactly the steps the unsharded clipper does, ending at the unsharded parameters."""
    checks(tmp_path, ["clip", "accumulate", "layouts"])
    ranks = [result(tmp_path, "clip", r) for r in (0, 1)]
    assert ranks[0] == ranks[1], "every rank must see the same norm and take the same decision"
    steps = ranks[0]["steps"]
    for i, step in enumerate(steps):
        assert step["norm"] == pytest.approx(step["whole_norm"], rel=1e-5), i
        assert step["skip"] == step["whole_skip"], i
        assert step["collectives"] == 1, step
    assert [i for i, s in enumerate(steps) if s["skip"] == 1.0] == [9]  # the outlier batch
    assert ranks[0]["counts"][0] == ranks[0]["counts"][1]  # clipped and skipped steps, sharded == whole
    assert ranks[0]["counts"][0][0] >= 2  # the warm-up cap and the 3x spike were clipped
    assert ranks[0]["final_param_gap"] < 1e-5
    for rank in (0, 1):
        accumulated = result(tmp_path, "accumulate", rank)
        assert accumulated["norm"] == pytest.approx(accumulated["whole_norm"], rel=1e-5)
        layouts = result(tmp_path, "layouts", rank)
        assert layouts["norm"] == pytest.approx(layouts["want"], rel=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("saved_on", "loaded_on"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_sharded_checkpoint_loads_on_another_world_size(
    tmp_path: Path, saved_on: int, loaded_on: int
) -> None:
    """A CheckpointManager save of FSDP2 model and optimizer state on one number of ranks loads on another
    (DCP reshards) with every parameter and Adam moment equal to what was saved."""
    checks(tmp_path, ["save"], nproc=saved_on)
    saved = result(tmp_path, "save", 0)
    assert all(result(tmp_path, "save", r) == saved for r in range(saved_on))
    checks(tmp_path, ["load"], nproc=loaded_on)
    for rank in range(loaded_on):
        loaded = result(tmp_path, "load", rank)
        assert loaded["step"] == 3
        assert loaded["params"] == saved["params"]
        assert loaded["moments"] == saved["moments"]
    assert len(saved["moments"]) == 12  # exp_avg and exp_avg_sq of 6 tensors: the optimizer state is there


@pytest.mark.timeout(600)
def test_fsdp_crash_and_hang_are_healed_and_the_run_ends_exact(tmp_path: Path) -> None:
    """Under `trainwarden run`, a SIGSTOPped and later a SIGKILLed FSDP2 rank are each restarted once from
    the sharded checkpoint, both ranks report to the daemon, and the run ends with the parameters of an
    uninterrupted run."""
    steps, hang_at, crash_at = 120, 40, 80
    data = make_data(tmp_path, steps)
    expected = reference(tmp_path / "reference", data, steps)
    assert expected["finite"] is True
    run = supervised(
        tmp_path,
        trainer_args(data, steps, "--step-sleep", "0.03", ckpt=tmp_path / "ckpt", out=tmp_path / "out"),
    )
    run.proc.wait_for(rf"^STEP {hang_at} ", 300)
    seen = metrics_by_rank(run.metrics(), "trainwarden_train_step")
    assert set(seen) == {"0", "1"}, seen
    os.kill(run.rank_pid(1, script="fsdp_trainer"), signal.SIGSTOP)
    run.proc.wait_for(rf"^STEP {crash_at} ", 300)
    os.kill(run.rank_pid(0, script="fsdp_trainer"), signal.SIGKILL)
    assert run.proc.wait(400) == 0, run.proc.output()
    assert final(tmp_path / "out") == expected, run.proc.output()
    rules = sorted(str(e.rule) for e in taken(run.journal(), "checkpoint_restart"))
    assert rules.count("stall") == 1, rules
    assert sum(rules.count(r) for r in ("process_exit", "process_gone")) == 1, rules
    assert len(rules) == 2, rules


@pytest.mark.timeout(600)
def test_daemons_checkpoint_request_is_answered_with_a_sharded_checkpoint(tmp_path: Path) -> None:
    """A grad-norm spike routed to checkpoint_restart makes the daemon request a checkpoint: the FSDP2 job
    saves one at the next step boundary, the daemon sees it and restarts, and the job resumes from it."""
    steps, spike = 130, 80
    data = make_data(tmp_path, steps, {spike: ("spike", 0)})
    run = supervised(
        tmp_path,
        trainer_args(data, steps, "--step-sleep", "0.03", ckpt=tmp_path / "ckpt", out=tmp_path / "out"),
        extra_config='[policy.routes]\nspike = ["checkpoint_restart"]\n',
    )
    saved = int(run.proc.wait_for(r"^SAVED (\d+)$", 300).group(1))
    assert saved >= spike
    resumed = int(run.proc.wait_for(r"^RESUMED (\d+)$", 300).group(1))
    # The job resumes from the newest checkpoint: the requested one, or a periodic one (every 10 steps) that
    # a loaded machine let it write before the restart landed.
    assert resumed == saved or (resumed > saved and (resumed + 1) % 10 == 0), (saved, resumed)
    assert run.proc.wait(400) == 0, run.proc.output()
    actions = taken(run.journal(), "checkpoint_restart", "spike")
    assert len(actions) == 1, actions
    assert "checkpoint=saved" in actions[0].detail, actions[0].detail
    assert final(tmp_path / "out")["finite"] is True
