"""The rollback request in the control file (strict validation, fuzzed) and the Snapshotter in one process."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from trainwarden import protocol
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.reporter import Reporter
from trainwarden.client.snapshot import Snapshotter
from trainwarden.control import (
    MAX_STEP,
    ClipSettings,
    ControlFileError,
    ControlState,
    RollbackRequest,
    control_path,
    write_control,
)

FUZZ = settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def parse(request: object) -> ControlState:
    """A control file holding `request` as its rollback_request, parsed."""
    return ControlState.from_json(json.dumps({"version": 1, "rollback_request": request}), "ctl")


def test_rollback_request_round_trips_and_old_files_stay_valid() -> None:
    """A written request reads back equal; a file without the field (older daemon) reads as no request."""
    state = ControlState(job="j", rollback_request=RollbackRequest("r-1", 42))
    assert ControlState.from_json(state.to_json()) == state
    assert parse(None).rollback_request is None
    assert "rollback_request" not in json.loads(ControlState(job="j").to_json())


@pytest.mark.parametrize(
    ("request_value", "field"),
    [
        ({"id": "", "step": 1}, "rollback_request.id"),
        ({"id": "x" * 257, "step": 1}, "rollback_request.id"),
        ({"id": 7, "step": 1}, "rollback_request.id"),
        ({"id": "r", "step": -1}, "rollback_request.step"),
        ({"id": "r", "step": True}, "rollback_request.step"),
        ({"id": "r", "step": 1.0}, "rollback_request.step"),
        ({"id": "r", "step": MAX_STEP + 1}, "rollback_request.step"),
        ({"id": "r"}, "rollback_request"),
        ({"id": "r", "step": 1, "more": 1}, "rollback_request"),
        ("r", "rollback_request"),
        ([1, 2], "rollback_request"),
    ],
)
def test_bad_rollback_request_is_an_error_naming_the_field(request_value: object, field: str) -> None:
    """Every malformed request is refused with an error that names the file and the field."""
    with pytest.raises(ControlFileError) as info:
        parse(request_value)
    assert f"ctl: field {field}=" in str(info.value)


def test_huge_step_number_is_refused_without_converting_it() -> None:
    """A 400-digit step is refused by name with a bounded message (never an int() of it)."""
    text = '{"version": 1, "rollback_request": {"id": "r", "step": ' + "9" * 400 + "}}"
    with pytest.raises(ControlFileError) as info:
        ControlState.from_json(text, "ctl")
    assert "rollback_request.step" in str(info.value)
    assert len(str(info.value)) < 300


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "step", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(JSON_VALUES)
def test_any_rollback_request_value_parses_or_raises_control_file_error(value: Any) -> None:
    """Whatever JSON value the field holds, the reader returns a valid request or raises ControlFileError."""
    try:
        request = parse(value).rollback_request
    except ControlFileError:
        return
    assert request is None or (isinstance(request.id, str) and 0 <= request.step <= MAX_STEP)


def test_reporter_keeps_the_last_good_request_when_the_file_turns_bad(tmp_path: Path) -> None:
    """A control file replaced by a bad one keeps the previous request in force and counts the error."""
    path = control_path(tmp_path, "job")
    write_control(path, ControlState(job="job", rollback_request=RollbackRequest("r1", 5)))
    reporter = Reporter(
        job="job",
        socket_path=tmp_path / "none.sock",
        control_dir=tmp_path,
        background=False,
        control_interval=0.0,
        stack_dump=False,
    )
    try:
        assert reporter.poll_control().rollback_request == RollbackRequest("r1", 5)
        path.write_text('{"version": 1, "rollback_request": {"id": "r2", "step": "5"}}', encoding="utf-8")
        assert reporter.poll_control().rollback_request == RollbackRequest("r1", 5)
        assert reporter.stats().control_errors == 1
    finally:
        reporter.close()


def test_unknown_capability_is_refused_at_construction(tmp_path: Path) -> None:
    """A misspelt capability is a programming error, raised at once rather than silently not advertised."""
    with pytest.raises(ValueError, match="rolback"):
        Reporter(job="job", socket_path=tmp_path / "none.sock", capabilities=("rolback",), stack_dump=False)


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [(None, ()), (["rollback"], ("rollback",)), (["rollback", "teleport", "rollback"], ("rollback",))],
)
def test_hello_capabilities_are_parsed_and_unknown_names_ignored(
    capabilities: list[str] | None, expected: tuple[str, ...]
) -> None:
    """A hello's capabilities are parsed; names a newer client knows and this daemon does not are ignored."""
    hello: dict[str, object] = {"type": "hello", "v": 1, "job": "j", "rank": 0, "local_rank": 0,
                                "world_size": 1, "pid": 1, "restart_count": 0}  # fmt: skip
    if capabilities is not None:
        hello["capabilities"] = capabilities
    record = protocol.parse(json.dumps(hello).encode())
    assert isinstance(record, protocol.Hello)
    assert record.capabilities == expected


@pytest.mark.parametrize("bad", ["rollback", [1], [""], ["x"] * 17])
def test_malformed_capabilities_reject_the_hello_by_field(bad: object) -> None:
    """A capabilities field of the wrong shape is a bad record naming `hello.capabilities`."""
    hello = {"type": "hello", "v": 1, "job": "j", "rank": 0, "local_rank": 0, "world_size": 1, "pid": 1,
             "restart_count": 0, "capabilities": bad}  # fmt: skip
    with pytest.raises(protocol.RecordError, match=r"hello\.capabilities"):
        protocol.parse(json.dumps(hello).encode())


class FakeControl:
    """A control source the test sets by hand (what `Reporter.poll_control` returns)."""

    def __init__(self) -> None:
        self.state = ControlState(job="job")

    def poll_control(self) -> ControlState:
        return self.state


def train(
    steps: int,
    *,
    every: int,
    bad: tuple[int, ...] = (),
    skip: tuple[int, ...] = (),
    control: FakeControl | None = None,
    request_at: int | None = None,
) -> tuple[nn.Module, Snapshotter]:
    """A small model trained with AdamW + clipper + dropout; `bad` steps get NaN inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    clipper = AdaptiveClipper(model.parameters(), ClipSettings())
    snap = Snapshotter(
        {"m": model, "o": optimizer, "s": scheduler, "c": clipper}, every=every, reporter=control
    )
    data = torch.randn(steps, 16, 4, generator=torch.Generator().manual_seed(1))
    for step in snap.steps(0, steps):
        if step in skip:
            continue
        if control is not None and step == request_at:
            control.state = ControlState(job="job", rollback_request=RollbackRequest("req", step - 2))
        x = data[step].clone()
        if step in bad:
            x[0, 0] = float("nan")
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        norm = clipper.clip()
        optimizer.step()
        scheduler.step()
        snap.after_step(step, loss=loss.detach(), grad_norm=norm)
    return model, snap


def same(a: nn.Module, b: nn.Module) -> bool:
    """torch.equal on every tensor of two modules' state."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fault_free_run_is_unchanged_by_snapshots() -> None:
    """Snapshots only copy: a run with them ends bit-identical to one without (every=1 and every=7)."""
    plain, _ = train(40, every=10_000)
    for every in (1, 7):
        model, snap = train(40, every=every)
        assert same(model, plain)
        assert snap.rollbacks == []


def test_nan_rolls_back_and_matches_the_run_that_skipped_it() -> None:
    """A NaN at step 17 is rolled back at the next boundary (step 19, every=5) to the snapshot before step 15;
    the run ends with the parameters of a run that skipped batch 17, dropout RNG and LR schedule included."""
    reference, _ = train(40, every=5, skip=(17,))
    model, snap = train(40, every=5, bad=(17,))
    assert [(r.at_step, r.next_step, r.skipped) for r in snap.rollbacks] == [(19, 15, 17)]
    assert same(model, reference)


def test_nan_in_the_last_steps_is_rolled_back_before_the_loop_ends() -> None:
    """A NaN after the last boundary is still found: `steps()` checks the tail before it stops."""
    reference, _ = train(23, every=5, skip=(21,))
    model, snap = train(23, every=5, bad=(21,))
    assert [r.skipped for r in snap.rollbacks] == [21]
    assert same(model, reference)


def test_daemon_request_rolls_back_before_the_named_step() -> None:
    """A rollback request naming step 10 (read at step 12) restores the newest snapshot before step 10 and
    skips batch 10: the result equals a run that skipped it."""
    reference, _ = train(30, every=4, skip=(10,))
    model, snap = train(30, every=4, control=FakeControl(), request_at=12)
    assert [(r.next_step, r.skipped, r.reason) for r in snap.rollbacks] == [(8, 10, "the daemon asked")]
    assert same(model, reference)


def test_rollbacks_in_a_row_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A fault that outlasts `max_rollbacks` rollbacks in a row is left visible (for the daemon to escalate)
    instead of rolling back for ever."""
    caplog.set_level(logging.WARNING, logger="trainwarden.client.snapshot")
    _, snap = train(40, every=5, bad=tuple(range(10, 40)))
    assert [r.skipped for r in snap.rollbacks] == [10, 11, 12]
    assert "not rolling back" in caplog.text


def test_skipped_batches_survive_a_resume_through_state_dict() -> None:
    """The skipped batches and handled request ids go into the checkpoint's local state and come back."""
    _, snap = train(25, every=5, bad=(7,))
    fresh = Snapshotter({}, every=5)
    fresh.load_state_dict(json.loads(json.dumps(snap.state_dict())))
    assert fresh.skipped == (7,)
    with pytest.raises(ValueError, match="skipped"):
        fresh.load_state_dict({"skipped": ["7"]})
