"""A checkpoint restart takes effect when the job is back (its first new step), not when it was applied."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainwarden.backends.base import RankProcess
from trainwarden.collectors.training_metrics import LAST_STEP_TS
from trainwarden.healers.base import Action, HealerContext
from trainwarden.healers.checkpoint_restart import CheckpointRestartHealer, CheckpointRestartOptions
from trainwarden.store import Store


class Jobs:
    def __init__(self, ranks: Sequence[RankProcess]) -> None:
        self.ranks = list(ranks)

    def processes(self, job: str) -> Sequence[RankProcess]:
        return [r for r in self.ranks if r.job == job]

    def forget(self, job: str) -> None:
        self.ranks = [r for r in self.ranks if r.job != job]


def test_a_restart_is_in_effect_from_the_first_step_of_the_new_run(tmp_path: Path) -> None:
    store = Store()
    jobs = Jobs([])
    context = HealerContext(runtime_dir=tmp_path / "run", state_dir=tmp_path, store=store, jobs=jobs)
    healer = CheckpointRestartHealer(CheckpointRestartOptions(), context)
    action = Action("checkpoint_restart", key="k", reason="crash", subject={"job": "toy"})
    applied = 1000.0
    store.add("training", [LAST_STEP_TS.sample(990.0, job="toy", rank="0")], 990.0)  # the old run's last step
    assert healer.took_effect(action, applied) is None  # the new ranks have not said hello yet
    jobs.ranks = [RankProcess("toy", 0, 0, 4242), RankProcess("toy", 1, 1, 4243)]
    assert healer.took_effect(action, applied) is None  # hello, but no step since the restart
    store.add("training", [LAST_STEP_TS.sample(1003.5, job="toy", rank="1")], 1003.5)
    assert healer.took_effect(action, applied) == 1003.5  # back: a late exit of the old run is no evidence


def test_a_supervised_run_that_ends_before_its_first_step_is_the_evidence(tmp_path: Path) -> None:
    class Ended:  # the supervise backend's view of its new run
        ended_at: float | None = None

    store = Store()
    context = HealerContext(state_dir=tmp_path, store=store, jobs=Jobs([]), restart_backend=Ended())  # type: ignore[arg-type]
    healer = CheckpointRestartHealer(CheckpointRestartOptions(), context)
    action = Action("checkpoint_restart", key="k", reason="crash", subject={"job": "toy"})
    assert healer.took_effect(action, 1000.0) is None
    context.restart_backend.ended_at = 1001.0  # type: ignore[union-attr]
    assert healer.took_effect(action, 1000.0) == 1001.0


def test_without_a_view_of_the_job_a_restart_is_in_effect_once_applied(tmp_path: Path) -> None:
    healer = CheckpointRestartHealer(CheckpointRestartOptions(), HealerContext(state_dir=tmp_path))
    action = Action("checkpoint_restart", key="k", reason="crash", subject={"job": "toy"})
    assert healer.took_effect(action, 1000.0) == 1000.0
