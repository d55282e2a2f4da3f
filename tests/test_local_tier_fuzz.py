"""Fuzzing the local tier's directory: any damage gives an exact load (local or durable) or a refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainwarden.client.checkpoint import CheckpointManager
from trainwarden.client.manifest import MANIFEST_NAME, body_checksum

EXAMPLES = int(os.environ.get("TRAINWARDEN_FUZZ_EXAMPLES", "300")) // 6  # raise it for a longer hunt
FUZZ = settings(
    derandomize=True,
    max_examples=max(1, EXAMPLES),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DURABLE_STEP = 1
LOCAL_STEPS = (2, 3, 4)
KINDS = (
    "flip",
    "truncate",
    "delete",
    "extra",
    "symlink",
    "fifo",
    "swap",
    "edit",
    "garbage",
    "rename",
    "wipe",
)


def _value(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6.0) * step, "b": torch.full((2,), float(step))}


def _manager(root: Path) -> CheckpointManager:
    return CheckpointManager(
        root / "durable",
        durable_every=1000,
        local_dir=root / "local",
        local_every=1,
        local_keep_last=3,
        local_when_busy="wait",  # every local step written, however slow the machine
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A durable checkpoint of step 1 and local ones of steps 2-4, copied fresh for every example."""
    root = tmp_path_factory.mktemp("pristine")
    manager = _manager(root)
    manager.save(DURABLE_STEP, _value(DURABLE_STEP), data_position={"batch": DURABLE_STEP}, durable=True)
    for step in LOCAL_STEPS:
        manager.save(step, _value(step), data_position={"batch": step})
    manager.close()
    return root


def _local(root: Path, step: int) -> Path:
    return root / "local" / "rank_00000" / f"step_{step:010d}"


@st.composite
def damages(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """A few damage operations on local checkpoints: kind, step, a number choosing the file or byte."""
    return [
        (draw(st.sampled_from(KINDS)), draw(st.sampled_from(LOCAL_STEPS)), draw(st.integers(0, 10**6)))
        for _ in range(draw(st.integers(min_value=1, max_value=3)))
    ]


def _damage(root: Path, op: tuple[str, int, int]) -> None:  # noqa: C901 - one branch per kind
    kind, step, n = op
    checkpoint = _local(root, step)
    other = _local(root, LOCAL_STEPS[(LOCAL_STEPS.index(step) + 1) % len(LOCAL_STEPS)])
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and not p.is_symlink())
    if kind == "wipe":
        shutil.rmtree(root / "local", ignore_errors=True)
        return
    if not files:
        return
    target = files[n % len(files)]
    twin = other / target.relative_to(checkpoint)
    if kind in ("flip", "truncate"):
        data = bytearray(target.read_bytes())
        if kind == "truncate":
            target.write_bytes(bytes(data[: n % max(1, len(data))]))
        elif data:
            data[n % len(data)] ^= 1 << (n % 8)
            target.write_bytes(bytes(data))
    elif kind == "delete":
        target.unlink()
    elif kind == "extra":
        (checkpoint / "state" / f"__{n % 3}_0.distcp").write_bytes(b"\0" * (n % 64))
    elif kind == "symlink":
        target.unlink()
        target.symlink_to(twin)
    elif kind == "fifo":
        target.unlink()
        os.mkfifo(target)
    elif kind == "swap" and twin.is_file() and not twin.is_symlink():
        target.unlink()
        shutil.copyfile(twin, target)
    elif kind == "edit" and (checkpoint / MANIFEST_NAME).is_file():
        _edit(checkpoint / MANIFEST_NAME, n)
    elif kind == "garbage":
        (checkpoint.parent / f"step_{9 + n % 90:010d}").mkdir(exist_ok=True)
    elif kind == "rename" and not (checkpoint.parent / f"step_{50 + n % 9:010d}").exists():
        checkpoint.rename(checkpoint.parent / f"step_{50 + n % 9:010d}")


def _edit(manifest: Path, n: int) -> None:
    """Claim another rank, world size or step, with a valid self-checksum."""
    body = json.loads(manifest.read_text())
    field = n % 3
    if field == 0:
        body["ranks"][0]["rank"] = 1
        body["world_size"] = 2
    elif field == 1:
        body["world_size"] = 2
    else:
        body["step"] = 60 + n % 9
    body["checksum"] = body_checksum(body)
    manifest.write_text(json.dumps(body))


@FUZZ
@given(ops=damages())
def test_damaged_local_tier_loads_exactly_what_was_saved_or_falls_back(
    pristine: Path, tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]
) -> None:
    """After any damage to the local tier, load_latest never raises and loads exactly the values saved at
    the step it returns: the newest untouched local step or a newer intact one, else the durable step."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)
    for op in ops:
        _damage(root, op)
    target = {"w": torch.zeros(6), "b": torch.zeros(2)}
    resume = _manager(root).load_latest(target)
    assert resume is not None, "the durable checkpoint was never damaged"
    expected = _value(resume.step)
    assert all(torch.equal(target[k], expected[k]) for k in expected), f"a silent wrong load: {ops}"
    assert resume.data_position == {"batch": resume.step}
    untouched = [
        s for s in LOCAL_STEPS if all(op[1] != s for op in ops) and all(op[0] != "wipe" for op in ops)
    ]
    assert resume.step >= max(untouched, default=DURABLE_STEP)
    assert resume.tier == ("durable" if resume.step == DURABLE_STEP else "local")
    shutil.rmtree(root, ignore_errors=True)
