"""Fuzzing checkpoint loading: damaged manifests and directories give a correct load or a refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import fuzz
from trainwarden.client.checkpoint import CheckpointManager
from trainwarden.client.manifest import (
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    body_checksum,
    parse_manifest,
)

FUZZ = fuzz()
STEPS = (1, 2, 3)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _saved_value(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6.0) * step, "b": torch.full((2,), float(step))}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three valid checkpoints (steps 1-3) of a small state, copied fresh for every example."""
    root = tmp_path_factory.mktemp("pristine")
    manager = CheckpointManager(root, keep_last=5)
    for step in STEPS:
        manager.save(step, _saved_value(step), data_position={"batch": step})
    return root


def _files(root: Path, step: int) -> list[Path]:
    return sorted(p for p in (root / f"step_{step:010d}").rglob("*") if p.is_file())


@st.composite
def damages(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """A few damage operations, each naming a checkpoint step and what to do to it."""
    ops = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        step = draw(st.sampled_from(STEPS))
        kind = draw(
            st.sampled_from(
                ["flip", "truncate", "delete", "extra", "symlink", "fifo", "edit", "manifest_bytes", "swap"]
            )
        )
        ops.append((kind, step, draw(st.integers(min_value=0, max_value=10**6)), draw(json_values)))
    return ops


def _damage(root: Path, op: tuple[Any, ...]) -> None:
    kind, step, n, value = op
    files = _files(root, step)
    if not files:
        return
    target = files[n % len(files)]
    checkpoint = root / f"step_{step:010d}"
    manifest = checkpoint / MANIFEST_NAME
    other = root / f"step_{STEPS[(STEPS.index(step) + 1) % 3]:010d}" / target.relative_to(checkpoint)
    if kind in ("flip", "truncate"):
        _corrupt(target, n, truncate=kind == "truncate")
    elif kind == "delete":
        target.unlink()
    elif kind == "extra":
        (checkpoint / "state" / f"__{n % 3}_0.distcp").write_bytes(b"\0" * (n % 64))
    elif kind == "symlink":  # a file pointing at the same file of another checkpoint
        target.unlink()
        target.symlink_to(other)
    elif kind == "fifo":
        target.unlink()
        os.mkfifo(target)
    elif kind == "swap" and other.is_file() and not other.is_symlink():  # another checkpoint's bytes
        target.unlink()
        shutil.copyfile(other, target)
    elif kind == "edit" and manifest.is_file() and not manifest.is_symlink():
        _edit(manifest, n, value)
    elif kind == "manifest_bytes" and manifest.exists() and not manifest.is_symlink():
        manifest.unlink()
        manifest.write_bytes(json.dumps(value).encode()[: 1 + n % 200])


def _corrupt(target: Path, n: int, *, truncate: bool) -> None:
    data = bytearray(target.read_bytes())
    if truncate:
        target.write_bytes(bytes(data[: n % max(1, len(data))]))
    elif data:
        data[n % len(data)] ^= 1 << (n % 8)
        target.write_bytes(bytes(data))


def _edit(manifest: Path, n: int, value: Any) -> None:
    """Set one field (top level, a file entry or the rank's rng) to `value` and fix the self-checksum."""
    try:
        body = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(body, dict):
        return
    where = n % 4
    if where == 0:
        keys = sorted(body)
        body[keys[n % len(keys)]] = value
    elif where == 1 and isinstance(body.get("files"), dict) and body["files"]:
        names = sorted(body["files"])
        body["files"][names[n % len(names)]] = value
    elif where == 2 and isinstance(body.get("ranks"), list) and body["ranks"]:
        body["ranks"][0]["rng"] = value
    else:
        body["step"] = value
    body["checksum"] = body_checksum(body)
    manifest.write_text(json.dumps(body))


@fuzz(1 / 2)
@given(ops=damages())
def test_damaged_checkpoints_load_exactly_what_was_saved_or_are_refused(
    pristine: Path, tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]]
) -> None:
    """After any damage, load_latest gives a step holding exactly what was saved, or None; never raises."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)
    for op in ops:
        _damage(root, op)
    target = {"w": torch.zeros(6), "b": torch.zeros(2)}
    loader = CheckpointManager(root)
    resume = loader.load_latest(target)
    untouched = [s for s in STEPS if all(op[1] != s for op in ops)]
    if resume is None:
        assert not untouched, f"checkpoint {untouched} was intact but nothing loaded"
    else:
        expected = _saved_value(resume.step)
        assert all(torch.equal(target[k], expected[k]) for k in expected), "a silent wrong load"
        assert resume.data_position == {"batch": resume.step}
        if untouched:
            assert resume.step >= max(untouched)
    shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(text=st.one_of(st.text(max_size=300), json_values.map(json.dumps)))
def test_any_manifest_text_parses_to_a_valid_manifest_or_a_checkpoint_error(text: str) -> None:
    """Arbitrary manifest text becomes a well-typed Manifest or a CheckpointError, nothing else."""
    try:
        manifest = parse_manifest(text, Path("manifest.json"))
    except CheckpointError:
        return
    assert isinstance(manifest, Manifest)
    assert type(manifest.step) is int
    assert 0 <= manifest.step < 10**10
