"""The control file reader: only regular files of bounded size, strict types, never raises or blocks."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.reporter import Reporter
from trainwarden.control import (
    MAX_CONTROL_BYTES,
    ClipSettings,
    ControlFileError,
    ControlState,
    control_path,
    read_control,
    write_control,
)

GOOD_CLIP = {"z_threshold": 2.0, "ema_alpha": 0.9, "warmup_steps": 10, "warmup_max_norm": 1.0}


def _write(path: Path, body: dict[str, Any]) -> None:
    path.write_text(json.dumps({"version": 1, "job": "job", **body}))


def _reporter(tmp_path: Path) -> Reporter:
    """A reporter with no daemon, polling the control file on every call."""
    return Reporter(
        job="job",
        socket_path=tmp_path / "absent.sock",
        control_dir=tmp_path,
        env={},
        background=False,
        control_interval=0.0,
        stack_dump=False,
    )


def test_written_state_reads_back_identically(tmp_path: Path) -> None:
    """What the daemon writes (requests, skips, clip with inf for "off", extra) is what the client reads."""
    path = control_path(tmp_path, "job")
    state = ControlState(
        job="job",
        clip=ClipSettings(z_threshold=2.0, skip_z_threshold=math.inf, warmup_max_norm=math.inf),
        checkpoint_request="tw-0123456789abcdef",
        stop_request="tw-fedcba9876543210",
        skip_batches=((37, 39), (100, 100)),
        updated_at=1234.5,
        extra={"clip_last_action": "k"},
    )
    write_control(path, state)
    assert read_control(path) == state


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"stop_request": False}, "stop_request"),
        ({"stop_request": 0}, "stop_request"),
        ({"stop_request": ""}, "stop_request"),
        ({"checkpoint_request": 5}, "checkpoint_request"),
        ({"checkpoint_request": []}, "checkpoint_request"),
        ({"checkpoint_request": {}}, "checkpoint_request"),
        ({"skip_batches": ["12"]}, "skip_batches[0]"),
        ({"skip_batches": [[1.5, 2.5]]}, "skip_batches[0]"),
        ({"skip_batches": [[True, False]]}, "skip_batches[0]"),
        ({"skip_batches": [[5, 2]]}, "skip_batches[0]"),
        ({"skip_batches": [[-1, 2]]}, "skip_batches[0]"),
        ({"skip_batches": [[0, 2**63 - 1]]}, "skip_batches[0]"),
        ({"skip_batches": "1-2"}, "skip_batches"),
        ({"clip": {**GOOD_CLIP, "z_threshold": 10**400}}, "z_threshold"),
        ({"clip": {**GOOD_CLIP, "warmup_max_norm": 10**400}}, "warmup_max_norm=<integer of 401 digits>"),
        ({"extra": {"n": 10**400}}, "extra"),
        ({"clip": {**GOOD_CLIP, "warmup_max_norm": 10**30 * 1e9}}, "warmup_max_norm"),
        ({"clip": {**GOOD_CLIP, "warmup_steps": 10.0}}, "warmup_steps"),
        ({"clip": {**GOOD_CLIP, "warmup_steps": True}}, "warmup_steps"),
        ({"clip": {**GOOD_CLIP, "z_threshold": "2"}}, "z_threshold"),
        ({"clip": {**GOOD_CLIP, "bogus": 1}}, "bogus"),
        ({"clip": [1, 2]}, "clip"),
        ({"updated_at": "now"}, "updated_at"),
        ({"extra": []}, "extra"),
        ({"job": 7}, "job"),
    ],
)
def test_wrong_types_and_ranges_are_refused_naming_the_field(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    """A field of another type than the writer's (false, 0, "12", 1.5, true, a 401-digit int) is an error."""
    path = tmp_path / "job.control.json"
    _write(path, body)
    with pytest.raises(ControlFileError) as err:
        read_control(path)
    assert str(path) in str(err.value)
    assert field in str(err.value)
    assert len(str(err.value)) < 1000


@pytest.mark.parametrize(
    "text",
    ['{"version": true}', '{"version": 1.0}', '{"version": 2}', "[]", "{", "[" * 100_000, '{"version": NaN}'],
)
def test_versions_and_bad_json_are_refused(tmp_path: Path, text: str) -> None:
    """Only version 1 (the int) is read; broken JSON, a depth bomb and NaN are errors, not exceptions."""
    path = tmp_path / "job.control.json"
    path.write_text(text)
    with pytest.raises(ControlFileError, match=str(path)):
        read_control(path)


def _refused_without_blocking(path: Path) -> str:
    """Read `path` on a thread; fail if it blocks, return the error message."""
    result: list[BaseException | ControlState] = []
    thread = threading.Thread(target=lambda: result.append(_catch(path)), daemon=True)
    thread.start()
    thread.join(timeout=10.0)
    assert not thread.is_alive(), f"read_control({path}) blocked"
    assert isinstance(result[0], ControlFileError)
    return str(result[0])


def _catch(path: Path) -> BaseException | ControlState:
    try:
        return read_control(path)
    except BaseException as exc:  # the test inspects whatever came out
        return exc


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO as the control file is refused at once instead of blocking the training loop."""
    path = tmp_path / "job.control.json"
    os.mkfifo(path)
    assert "not a regular file" in _refused_without_blocking(path)


def test_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    """A symlink (here to /dev/zero, which would read until MemoryError) is refused unread."""
    path = tmp_path / "job.control.json"
    path.symlink_to("/dev/zero")
    assert "symbolic link" in _refused_without_blocking(path)


def test_directory_and_oversized_file_are_refused(tmp_path: Path) -> None:
    """A directory or a regular file beyond MAX_CONTROL_BYTES is refused with what is wrong."""
    path = tmp_path / "job.control.json"
    path.mkdir()
    assert "not a regular file" in _refused_without_blocking(path)
    path.rmdir()
    path.write_text(" " * (MAX_CONTROL_BYTES + 1) + "{}")
    assert "exceeds the limit" in _refused_without_blocking(path)


def test_reporter_keeps_the_last_good_state_and_counts_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a good file, a bad one (false stop) is counted and logged once; the good state stays in force."""
    reporter = _reporter(tmp_path)
    try:
        path = control_path(tmp_path, "job")
        good = ControlState(job="job", checkpoint_request="tw-1", clip=ClipSettings(z_threshold=2.0))
        write_control(path, good)
        assert reporter.poll_control() == good
        _write(path, {"stop_request": False, "skip_batches": [[True, False]]})
        with caplog.at_level("WARNING"):
            assert reporter.poll_control() == good
        assert reporter.stats().control_errors == 1
        assert [r.getMessage() for r in caplog.records if "stop_request" in r.getMessage()]
        path.unlink()
        os.mkfifo(path)
        assert reporter.poll_control() == good
        assert reporter.stats().control_errors == 2
    finally:
        reporter.close()


def test_clipper_update_never_raises_and_clip_keeps_working() -> None:
    """Huge or mistyped settings handed to update() are counted and ignored; the next clip() works."""
    import torch  # noqa: PLC0415 - only this test needs torch

    param = torch.nn.Parameter(torch.zeros(4))
    clipper = AdaptiveClipper([param], ClipSettings(warmup_steps=2))
    bad: list[Any] = [
        ClipSettings(z_threshold=10**400),  # type: ignore[arg-type]
        ClipSettings(warmup_max_norm=10**400),  # type: ignore[arg-type]
        ClipSettings(warmup_max_norm=1e300),
        ClipSettings(warmup_steps=10**400),
        ClipSettings(ema_alpha="0.5"),  # type: ignore[arg-type]
        None,
        "nonsense",
    ]
    for settings in bad:
        assert clipper.update(settings) is False
    assert clipper.rejected_updates == len(bad)
    for _ in range(4):
        param.grad = torch.full((4,), 3.0)
        assert math.isfinite(clipper.clip().item())
