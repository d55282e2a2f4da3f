"""The checkpoint-restart healer's three paths (checkpoint first, skip batches, hang) against a real store
and control file, with a recording backend in place of a real restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from trainwarden.backends.base import RankProcess, RestartBackend
from trainwarden.control import control_path, read_control
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, HealerContext
from trainwarden.healers.checkpoint_restart import (
    LAST_CHECKPOINT_TS,
    CheckpointRestartHealer,
    CheckpointRestartOptions,
    request_id,
)
from trainwarden.model import MetricSpec
from trainwarden.store import Store

CKPT_TS = MetricSpec(LAST_CHECKPOINT_TS, "test", labelnames=("job", "rank"))


class RecordingBackend(RestartBackend):
    name = "recording"

    def __init__(self, retired: set[int] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.retire(retired or ())

    def _restart(self, job: str, reason: str, *, dry_run: bool) -> ActionResult:
        assert not dry_run
        self.calls.append((job, reason))
        return ActionResult(ActionOutcome.APPLIED, f"restarted {job}", {"pid": 4242})


class Jobs:
    def __init__(self, ranks: Sequence[RankProcess]) -> None:
        self.ranks = list(ranks)
        self.forgotten: list[str] = []

    def processes(self, job: str) -> Sequence[RankProcess]:
        return [r for r in self.ranks if r.job == job]

    def forget(self, job: str) -> None:
        self.forgotten.append(job)


def _healer(
    tmp_path: Path, backend: RestartBackend, store: Store | None = None, **options: object
) -> tuple[CheckpointRestartHealer, Jobs]:
    jobs = Jobs([RankProcess("toy", 0, 0, 999_998), RankProcess("toy", 1, 1, 999_999)])
    context = HealerContext(
        runtime_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        store=store or Store(),
        jobs=jobs,
        restart_backend=backend,
    )
    opts = CheckpointRestartOptions(**{"checkpoint_timeout_seconds": 2.0, **options})  # type: ignore[arg-type]
    return CheckpointRestartHealer(opts, context), jobs


def _action(rule: str, key: str = "k", **params: float | str) -> Action:
    return Action(
        "checkpoint_restart",
        key,
        f"{rule} on toy",
        {"job": "toy"},
        {"rule": rule, **params},
        {"pid": params["pid"]} if "pid" in params else {},
    )


def test_bad_job_checkpoints_first_then_restarts(tmp_path: Path) -> None:
    """A spike asks for a checkpoint in the control file and restarts once every rank reported a newer one."""
    store = Store()
    backend = RecordingBackend()
    healer, jobs = _healer(tmp_path, backend, store)
    path = control_path(tmp_path / "run" / "control", "toy")

    def job_saves() -> None:
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        now = time.time()
        store.replace("training", [CKPT_TS.sample(now, job="toy", rank=r) for r in ("0", "1")], now)

    saver = threading.Thread(target=job_saves)
    saver.start()
    result = healer.apply(_action("spike"), dry_run=False)
    saver.join()
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert result.data["checkpoint"] == "saved"
    assert read_control(path).checkpoint_request == request_id("k")
    assert backend.calls == [("toy", "spike on toy")]
    assert jobs.forgotten == ["toy"]


def test_checkpoint_timeout_still_restarts_and_says_so(tmp_path: Path) -> None:
    """A job that never answers the checkpoint request is restarted after the bounded wait anyway."""
    backend = RecordingBackend()
    healer, _ = _healer(tmp_path, backend, checkpoint_timeout_seconds=0.3)
    result = healer.apply(_action("throughput_drop"), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED
    assert result.data["checkpoint"] == "timeout"
    assert "checkpoint=timeout" in result.detail
    assert len(backend.calls) == 1


def test_nonfinite_skips_batches_without_a_new_checkpoint(tmp_path: Path) -> None:
    """NaN: no checkpoint request (the newest one predates it); skip_batches around the first bad step."""
    backend = RecordingBackend()
    healer, _ = _healer(tmp_path, backend, skip_batches_after=2)
    result = healer.apply(_action("nonfinite", first_step=37.0, last_step=60.0), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    state = read_control(control_path(tmp_path / "run" / "control", "toy"))
    assert state.skip_batches == ((37, 39),)
    assert state.checkpoint_request is None
    again = healer.apply(_action("nonfinite", key="k2", first_step=37.0), dry_run=False)
    assert again.outcome is ActionOutcome.APPLIED
    assert read_control(control_path(tmp_path / "run" / "control", "toy")).skip_batches == ((37, 39),)


def test_hang_captures_stacks_and_restarts(tmp_path: Path) -> None:
    """A stall restarts without a checkpoint request; ranks whose processes are gone yield no stacks."""
    backend = RecordingBackend()
    healer, _ = _healer(tmp_path, backend)
    result = healer.apply(_action("stall"), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED
    assert result.data["mode"] == "capture stacks"
    assert result.data["stacks"] == "none"
    assert not control_path(tmp_path / "run" / "control", "toy").exists()


def test_dry_run_and_stale_findings_touch_nothing(tmp_path: Path) -> None:
    """Dry run writes and restarts nothing; a process_gone about an earlier run's pid is a no-op."""
    backend = RecordingBackend(retired={999, 222})
    healer, jobs = _healer(tmp_path, backend)
    dry = healer.apply(_action("nonfinite", first_step=3.0), dry_run=True)
    assert dry.outcome is ActionOutcome.DRY_RUN
    stale = healer.apply(_action("process_gone", pid=999.0), dry_run=False)
    assert stale.outcome is ActionOutcome.NOOP
    assert "earlier run" in stale.detail
    assert backend.calls == []
    assert jobs.forgotten == []
    assert not (tmp_path / "run" / "control").exists()
    crashed = healer.apply(_action("process_gone", key="k3", pid=555.0), dry_run=False)
    assert crashed.outcome is ActionOutcome.APPLIED  # a pid of the current run died: a real crash


def test_unreadable_control_file_fails_without_overwriting_it(tmp_path: Path) -> None:
    """A control file that does not parse is never replaced (it may hold requests); the action fails."""
    backend = RecordingBackend()
    healer, _ = _healer(tmp_path, backend)
    path = control_path(tmp_path / "run" / "control", "toy")
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    result = healer.apply(_action("nonfinite", first_step=5.0), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert path.read_text(encoding="utf-8") == "{not json"
    assert backend.calls == []


def test_supervise_without_a_supervised_child_fails_clearly(tmp_path: Path) -> None:
    """In a plain daemon (no `trainwarden run`) supervise is absent: a failed action naming why."""
    context = HealerContext(runtime_dir=tmp_path, state_dir=tmp_path)
    healer = CheckpointRestartHealer(CheckpointRestartOptions(), context)
    result = healer.apply(_action("stall"), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "trainwarden run" in result.detail


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"backend": "systemd"}, "systemd_unit"),
        ({"backend": "command"}, "command_argv"),
        ({"backend": "command", "command_argv": ("x", "{nope}")}, "command_argv"),
        ({"checkpoint_timeout_seconds": 0.0}, "checkpoint_timeout_seconds"),
    ],
)
def test_options_name_what_a_backend_needs(options: dict[str, object], key: str) -> None:
    """Each backend's own setting is required, and bounds are checked, with the key named."""
    assert key in [k for k, _why in CheckpointRestartOptions(**options).problems()]  # type: ignore[arg-type]


CKPT_STEP = MetricSpec("trainwarden_train_last_checkpoint_step", "test", labelnames=("job", "rank"))


def _checkpoint_at(store: Store, step: int) -> None:
    now = time.time()
    store.replace("training", [CKPT_STEP.sample(step, job="toy", rank=r) for r in ("0", "1")], now)


def test_nan_restart_refused_when_newest_checkpoint_is_past_the_first_bad_step(tmp_path: Path) -> None:
    """A checkpoint saved at or after the first NaN step may hold the NaN: no restart that would resume
    from it (and skip a good batch), a failure naming both steps, and the control file left alone."""
    store = Store()
    backend = RecordingBackend()
    healer, _ = _healer(tmp_path, backend, store)
    _checkpoint_at(store, 299)
    result = healer.apply(_action("nonfinite", first_step=293.0, last_step=301.0), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "newest checkpoint (step 299)" in result.detail
    assert "first non-finite step 293" in result.detail
    assert backend.calls == []
    assert not control_path(tmp_path / "run" / "control", "toy").exists()
    dry = healer.apply(_action("nonfinite", key="k2", first_step=293.0), dry_run=True)
    assert dry.outcome is ActionOutcome.DRY_RUN
    assert dry.detail.startswith("would not restart: will not restart job toy")


def test_nan_restart_goes_ahead_from_a_checkpoint_before_the_bad_step(tmp_path: Path) -> None:
    """With the newest checkpoint older than the first NaN step, the job is restarted and skips exactly
    the first bad batch, whatever later steps the finding reports."""
    store = Store()
    backend = RecordingBackend()
    healer, _ = _healer(tmp_path, backend, store)
    _checkpoint_at(store, 290)
    result = healer.apply(_action("nonfinite", first_step=293.0, last_step=301.0, step=301.0), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert read_control(control_path(tmp_path / "run" / "control", "toy")).skip_batches == ((293, 293),)
    assert len(backend.calls) == 1


def test_dry_run_that_cannot_act_is_not_a_failure(tmp_path: Path) -> None:
    """Observe-only on a daemon that supervises nothing reports what it would not do, never a failure
    (failures open the circuit breaker)."""
    context = HealerContext(runtime_dir=tmp_path, state_dir=tmp_path)
    healer = CheckpointRestartHealer(CheckpointRestartOptions(), context)
    result = healer.apply(_action("nonfinite", first_step=3.0), dry_run=True)
    assert result.outcome is ActionOutcome.DRY_RUN
    assert "trainwarden run" in result.detail


def test_a_rank_that_died_before_the_restart_is_not_restarted_again(tmp_path: Path) -> None:
    """After a restart, a process_gone about any rank of the old run (also one that crashed on its own, so
    the backend never killed it) is a no-op, not a second restart of the same crash."""
    backend = RecordingBackend()
    healer, _ = _healer(tmp_path, backend)
    assert healer.apply(_action("process_exit"), dry_run=False).outcome is ActionOutcome.APPLIED
    late = healer.apply(_action("process_gone", key="k2", pid=999_999.0), dry_run=False)
    assert late.outcome is ActionOutcome.NOOP
    assert len(backend.calls) == 1
