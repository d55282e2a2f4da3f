"""The clip healer changes clipping in the job's control file, idempotently; dry runs touch nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import wait_until
from training_support import collect_into, running_collector
from trainwarden.client import Reporter
from trainwarden.control import ClipSettings, ControlState, control_path, read_control, write_control
from trainwarden.healers.base import Action, ActionOutcome, HealerContext
from trainwarden.healers.clip import ClipHealer, ClipOptions
from trainwarden.store import Store


def _healer(tmp_path: Path, **options: float) -> ClipHealer:
    context = HealerContext(runtime_dir=tmp_path / "run", state_dir=tmp_path / "state", clock=lambda: 42.0)
    return ClipHealer(ClipOptions(**options), context)  # type: ignore[arg-type]


def _action(key: str = "a1", direction: str = "tighten", job: str = "toy") -> Action:
    return Action("clip", key, "spike", subject={"job": job}, params={"direction": direction})


def _path(tmp_path: Path) -> Path:
    return control_path(tmp_path / "run" / "control", "toy")


def test_tighten_creates_and_updates_control_file(tmp_path: Path) -> None:
    """Tightening lowers z_threshold by the factor and keeps the job's other requests."""
    write_control(_path(tmp_path), ControlState(job="toy", stop_request="s1", skip_batches=((5, 9),)))
    result = _healer(tmp_path).apply(_action(), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED
    state = read_control(_path(tmp_path))
    assert state.clip == ClipSettings(z_threshold=2.0)
    assert (state.stop_request, state.skip_batches, state.updated_at) == ("s1", ((5, 9),), 42.0)


def test_same_action_twice_is_noop(tmp_path: Path) -> None:
    """Applying one action key twice tightens once; a new key tightens again, down to the floor."""
    healer = _healer(tmp_path, min_z_threshold=1.7)
    assert healer.apply(_action("a1"), dry_run=False).outcome is ActionOutcome.APPLIED
    assert healer.apply(_action("a1"), dry_run=False).outcome is ActionOutcome.NOOP
    assert read_control(_path(tmp_path)).clip == ClipSettings(z_threshold=2.0)
    assert healer.apply(_action("a2"), dry_run=False).outcome is ActionOutcome.APPLIED
    clip = read_control(_path(tmp_path)).clip
    assert clip is not None
    assert clip.z_threshold == pytest.approx(1.7)
    floor = healer.apply(_action("a3"), dry_run=False)
    assert floor.outcome is ActionOutcome.NOOP
    assert "floor" in floor.detail


def test_relax_moves_back_toward_default(tmp_path: Path) -> None:
    """Relaxing raises z_threshold but never past the default."""
    write_control(_path(tmp_path), ControlState(job="toy", clip=ClipSettings(z_threshold=2.2)))
    healer = _healer(tmp_path)
    assert healer.apply(_action("r1", "relax"), dry_run=False).outcome is ActionOutcome.APPLIED
    clip = read_control(_path(tmp_path)).clip
    assert clip is not None
    assert clip.z_threshold == 2.5
    assert healer.apply(_action("r2", "relax"), dry_run=False).outcome is ActionOutcome.NOOP


def test_dry_run_touches_nothing(tmp_path: Path) -> None:
    """A dry run reports the change it would make and writes no file."""
    result = _healer(tmp_path).apply(_action(), dry_run=True)
    assert result.outcome is ActionOutcome.DRY_RUN
    assert "2.5 -> 2.0" in result.detail
    assert not _path(tmp_path).exists()


def test_corrupt_control_file_is_not_overwritten(tmp_path: Path) -> None:
    """A control file that cannot be parsed fails the action, naming the file, and is left as it was."""
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    result = _healer(tmp_path).apply(_action(), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "toy.control.json" in result.detail
    assert path.read_text(encoding="utf-8") == "{not json"


def test_bad_job_name_and_direction_fail_cleanly(tmp_path: Path) -> None:
    """A job name that could escape the directory, or an unknown direction, fails without writing."""
    healer = _healer(tmp_path)
    assert healer.apply(_action(job="../etc"), dry_run=False).outcome is ActionOutcome.FAILED
    assert healer.apply(_action(direction="sideways"), dry_run=False).outcome is ActionOutcome.FAILED
    assert not (tmp_path / "run").exists()


def test_clip_is_applied_only_once_the_job_reports_running_with_it(tmp_path: Path) -> None:
    """Until the job reports running with the new threshold, a clip is "written, not acknowledged"."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    store = Store()
    context = HealerContext(runtime_dir=runtime, state_dir=tmp_path / "state", store=store)
    healer = ClipHealer(ClipOptions(), context)
    with running_collector(runtime) as collector:
        reporter = Reporter(
            job="toy",
            socket_path=collector.socket_path,
            control_dir=runtime / "control",
            env={"RANK": "0", "WORLD_SIZE": "1"},
            stack_dump=False,
            control_interval=0.0,
        )
        try:
            reporter.clip_in_use(ClipSettings())  # a job that does report, before any action
            reporter.step(0, loss=1.0)
            reporter.flush()
            result = healer.apply(_action(), dry_run=False)
            assert result.outcome is ActionOutcome.APPLIED
            assert result.detail.endswith("(written, not acknowledged by the job yet)")
            assert result.data["acknowledged"] is False
            collect_into(collector, store)
            assert [s.value for s in healer.samples()] == [0.0]  # still on 2.5: the plain-loop case
            assert not healer.acknowledged("toy", 2.0)

            clip = reporter.poll_control().clip  # the documented loop: read, update, report
            assert clip is not None
            reporter.clip_in_use(clip)
            reporter.flush()

            def acknowledged() -> bool:
                collect_into(collector, store)
                return healer.acknowledged("toy", 2.0)

            wait_until(acknowledged, what="the job's acknowledgement of z_threshold 2.0")
            assert [(s.labels, s.value) for s in healer.samples()] == [((("job", "toy"),), 1.0)]
            again = healer.apply(_action(), dry_run=False)
            assert (again.outcome, again.detail.endswith("(acknowledged)")) == (ActionOutcome.NOOP, True)
        finally:
            reporter.close()
