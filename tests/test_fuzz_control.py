"""Fuzzing the control file reader: any bytes give a valid state or the last good one, never an exception."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import fuzz
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.reporter import Reporter
from trainwarden.control import (
    ClipSettings,
    ControlFileError,
    ControlState,
    clip_settings_problems,
    control_path,
    read_control,
    write_control,
)

FUZZ = fuzz()

GOOD: dict[str, Any] = json.loads(
    ControlState(
        job="job",
        clip=ClipSettings(),
        checkpoint_request="tw-1",
        stop_request=None,
        skip_batches=((3, 4),),
        extra={"k": "v"},
    ).to_json()
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([10**400, -(2**63), 2**63 - 1, 2**53]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
paths = st.sampled_from(
    [
        ("version",),
        ("job",),
        ("stop_request",),
        ("checkpoint_request",),
        ("skip_batches",),
        ("updated_at",),
        ("extra",),
        ("clip",),
        *[("clip", name) for name in ClipSettings.__dataclass_fields__],
    ]
)


@st.composite
def mutated_documents(draw: st.DrawFn) -> bytes:
    """A valid control file with a few fields replaced by arbitrary JSON, or a byte-level mutation."""
    doc = json.loads(json.dumps(GOOD))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(paths)
        target = doc
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = draw(json_values)
    text = json.dumps(doc).encode()
    if draw(st.booleans()):
        return text
    start = draw(st.integers(min_value=0, max_value=len(text)))
    cut = draw(st.integers(min_value=0, max_value=8))
    return text[:start] + draw(st.binary(max_size=8)) + text[start + cut :]


def _valid(state: ControlState) -> bool:
    """Every field has exactly the type the writer writes, and clip settings are usable."""
    requests_ok = all(
        r is None or (isinstance(r, str) and r) for r in (state.stop_request, state.checkpoint_request)
    )
    skips_ok = all(type(a) is int and type(b) is int and 0 <= a <= b < 2**53 for a, b in state.skip_batches)
    clip_ok = state.clip is None or not clip_settings_problems(state.clip)
    return requests_ok and skips_ok and clip_ok and math.isfinite(state.updated_at)


@FUZZ
@given(blob=st.one_of(mutated_documents(), st.binary(max_size=200)))
def test_any_bytes_give_a_valid_state_or_a_control_file_error(tmp_path: Path, blob: bytes) -> None:
    """Whatever the file holds, read_control returns a valid state or raises ControlFileError only."""
    path = tmp_path / "job.control.json"
    path.write_bytes(blob)
    try:
        state = read_control(path)
    except ControlFileError:
        return
    assert _valid(state)
    write_control(path, state)  # what the daemon reads it can write back
    assert read_control(path) == state


@fuzz(1 / 3)
@given(blobs=st.lists(mutated_documents(), min_size=1, max_size=4))
def test_reporter_and_clipper_never_raise_and_keep_the_last_good_state(
    tmp_path: Path, blobs: list[bytes]
) -> None:
    """poll_control() returns the newest valid state or the last good one; the clipper keeps clipping."""
    import torch  # noqa: PLC0415 - only the clipper needs torch

    reporter = Reporter(
        job="job",
        socket_path=tmp_path / "absent.sock",
        control_dir=tmp_path,
        env={},
        background=False,
        control_interval=0.0,
        stack_dump=False,
    )
    param = torch.nn.Parameter(torch.zeros(3))
    clipper = AdaptiveClipper([param], ClipSettings(warmup_steps=2))
    path = control_path(tmp_path, "job")
    last_good = ControlState(job="job")
    try:
        for i, blob in enumerate(blobs):
            path.write_bytes(blob)
            os.utime(path, ns=(i * 1_000_000_000, i * 1_000_000_000))  # a change the stat sees
            with contextlib.suppress(ControlFileError):
                last_good = read_control(path)
            state = reporter.poll_control()
            assert state == last_good
            clipper.update(state.clip or clipper.settings)
            param.grad = torch.full((3,), 2.0)
            assert math.isfinite(clipper.clip().item())
    finally:
        reporter.close()
