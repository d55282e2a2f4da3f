"""The framework callbacks in one process with the real frameworks: stop requests, exact resume, refusals,
and the promise that the daemon never imports a framework."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from integration_data import EPOCH, digest, write_data
from trainwarden.client.interrupt import EXIT_CHECKPOINTED
from trainwarden.client.reporter import Reporter
from trainwarden.control import ControlState, control_path, write_control
from trainwarden.integrations.core import BatchSize, CallbackCore, IntegrationStateError, batch_size

FRAMEWORK_MODULES = ("lightning", "pytorch_lightning", "transformers", "accelerate")


@pytest.fixture
def no_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No daemon socket; a control directory the test writes requests into."""
    monkeypatch.setenv("TRAINWARDEN_SOCKET", str(tmp_path / "absent.sock"))
    monkeypatch.setenv("TRAINWARDEN_CONTROL_DIR", str(tmp_path / "control"))
    monkeypatch.setenv("TRAINWARDEN_JOB", "cb")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "control"


def request(control: Path, **fields: str) -> None:
    """Write a request into the job's control file, as the daemon does."""
    write_control(control_path(control, "cb"), ControlState(job="cb", **fields))


def test_the_daemon_and_the_integrations_package_import_no_framework() -> None:
    """Importing the daemon (CLI, app) or `trainwarden.integrations` loads no framework."""
    code = (
        "import sys, trainwarden.daemon.cli, trainwarden.daemon.app, trainwarden.integrations;"
        f"print([m for m in {FRAMEWORK_MODULES!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_callback_state_of_another_version_is_refused_by_name() -> None:
    """Callback state in an unknown format is an error naming the version, never half-loaded."""
    core = CallbackCore()
    with pytest.raises(IntegrationStateError, match="version 99"):
        core.load_state_dict({"version": 99, "clipper": None, "interrupt": None})
    with pytest.raises(IntegrationStateError, match="list"):
        core.load_state_dict([])  # type: ignore[arg-type]


def test_batch_size_is_read_from_tensors_tuples_and_dicts() -> None:
    """Samples per batch come from the first tensor of a batch, whatever its container."""
    import torch  # noqa: PLC0415

    x = torch.zeros(8, 3)
    assert batch_size(x) == 8
    assert batch_size((x, torch.zeros(8))) == 8
    assert batch_size({"input_ids": torch.zeros(4, 16)}) == 4
    assert batch_size("text") is None


def test_batch_size_per_step_follows_a_changing_batch_structure() -> None:
    """The per-step reader, which looks first where the last batch had its tensor, counts every batch
    right when the structure changes: a smaller last batch, a dict, a bare tensor, a 0-d tensor, text."""
    import torch  # noqa: PLC0415

    batches = [
        (torch.zeros(8, 3), torch.zeros(8)),
        (torch.zeros(8, 3), torch.zeros(8)),
        (torch.zeros(5, 3), torch.zeros(5)),  # the last, smaller batch of an epoch
        [torch.zeros(6, 3)],
        {"input_ids": torch.zeros(4, 16)},
        torch.zeros(7, 2),
        torch.zeros(3),
        torch.tensor(1.0),  # 0-d: no samples
        (torch.tensor(1.0), torch.zeros(2)),
        "text",
        (),
        (torch.zeros(2, 3),),
    ]
    reader = BatchSize()
    assert [reader(batch) for batch in batches] == [8, 8, 5, 6, 4, 7, 3, None, None, None, None, 2]


def test_the_daemons_clip_settings_reach_the_clipper_at_the_next_boundary(no_daemon: Path) -> None:
    """A clip action written into the control file mid-run is applied by the callbacks' core at the next
    step boundary (one process), and kept while the file stays the same."""
    import torch  # noqa: PLC0415

    from trainwarden.control import ClipSettings  # noqa: PLC0415

    core = CallbackCore(reporter=Reporter.from_env(control_interval=0.0))
    core.start([torch.nn.Parameter(torch.zeros(3))])
    assert core.clipper is not None
    before = core.clipper.settings
    core.boundary(0)
    assert core.clipper.settings == before
    tightened = ClipSettings(z_threshold=before.z_threshold / 2)
    write_control(control_path(no_daemon, "cb"), ControlState(job="cb", clip=tightened))
    core.boundary(1)
    assert core.clipper.settings == tightened
    core.boundary(2)
    assert core.clipper.settings == tightened
    core.close()


# --- Lightning ---------------------------------------------------------------------------------------


def skip(control: Path, first: int, last: int) -> None:
    """Name batches first..last to skip in the job's control file, as the daemon does after a NaN."""
    write_control(control_path(control, "cb"), ControlState(job="cb", skip_batches=((first, last),)))


def lightning_fit(
    data: Path,
    ckpt: Path,
    steps: int,
    stop_at: tuple[Path, int] | None = None,
    nan_at: int | None = None,
    **trainer_options: object,
) -> tuple[object, object]:
    """Fit the integration job's model in this process (a stop request written after step `stop_at[1]`,
    a NaN loss at batch `nan_at`)."""
    import lightning.pytorch as pl  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: PLC0415

    from integration_lightning_job import Batches, Classifier  # noqa: PLC0415
    from trainwarden.integrations.lightning import TrainwardenCallback  # noqa: PLC0415

    class Requester(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
            if stop_at is not None and trainer.fit_loop.epoch_loop.total_batch_idx == stop_at[1]:
                request(stop_at[0], stop_request="stop-1")

    class Faulty(Classifier):
        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            bad = self.trainer.fit_loop.epoch_loop.total_batch_idx == nan_at
            return loss * float("nan") if bad else loss

    torch.manual_seed(0)
    model = Faulty(3e-3)
    # The control file is read at every step (not at most every 0.1 s), so the request is obeyed at
    # the step it was written in (the requester runs first), whatever the machine's load.
    warden = TrainwardenCallback(reporter=Reporter.from_env(control_interval=0.0))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            Requester(),
            warden,
            ModelCheckpoint(dirpath=ckpt, every_n_train_steps=10, save_last=True),
        ],
        **trainer_options,
    )
    trainer.fit(model, Batches(data, 0), ckpt_path="last")
    return warden, model


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop_after", [13, EPOCH - 1], ids=["mid-epoch", "epoch-last-batch"])
def test_lightning_stop_request_checkpoints_stops_and_resumes_exactly(
    tmp_path: Path, no_daemon: Path, stop_after: int
) -> None:
    """A stop request ends `fit` at that step with `last.ckpt` and exit status 75; `ckpt_path="last"`
    then finishes equal to an uninterrupted run, not obeying the request twice; also when the step
    is an epoch's last batch (the resume then starts the next epoch)."""
    import torch  # noqa: PLC0415

    data = write_data(tmp_path / "data", 60, world=1)
    _, plain = lightning_fit(data, tmp_path / "plain", 40)
    stopped, _ = lightning_fit(data, tmp_path / "ckpt", 40, stop_at=(no_daemon, stop_after))
    assert stopped.exit_status == EXIT_CHECKPOINTED  # type: ignore[attr-defined]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == stop_after + 1  # saved right after the step the request came at
    resumed, model = lightning_fit(data, tmp_path / "ckpt", 40)  # the request is still in the file
    assert resumed.exit_status == 0  # type: ignore[attr-defined]
    assert digest(model) == digest(plain)


@pytest.mark.timeout(300)
def test_lightning_skips_the_update_of_a_batch_named_in_skip_batches(tmp_path: Path, no_daemon: Path) -> None:
    """With batch 5 named in `skip_batches`, its NaN loss changes no parameter and no optimizer state:
    the run ends finite and bit-equal to a clean run that skips the same batch (one optimizer step
    fewer); without the skip the NaN ruins the parameters."""
    data = write_data(tmp_path / "data", 60, world=1)
    _, ruined = lightning_fit(data, tmp_path / "ruined", 12, nan_at=5)
    assert digest(ruined)[1] is False
    skip(no_daemon, 5, 5)
    _, skipped = lightning_fit(data, tmp_path / "skipped", 12, nan_at=5)
    _, clean = lightning_fit(data, tmp_path / "clean", 12)
    assert digest(skipped)[1] is True
    assert digest(skipped) == digest(clean)
    optimizer = skipped.trainer.optimizers[0]  # type: ignore[attr-defined]
    assert {int(state["step"]) for state in optimizer.state.values()} == {11}


@pytest.mark.timeout(120)
def test_lightning_refuses_its_own_clipping_beside_the_adaptive_one(tmp_path: Path, no_daemon: Path) -> None:
    """`gradient_clip_val` with `clip=True` stops `fit` before training, naming the setting."""
    data = write_data(tmp_path / "data", 5, world=1)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        lightning_fit(data, tmp_path / "ckpt", 3, gradient_clip_val=1.0)


# --- Hugging Face Trainer ----------------------------------------------------------------------------


def hf_train(
    data: Path,
    ckpt: Path,
    steps: int,
    max_grad_norm: float = 0.0,
    stop_at: tuple[Path, int] | None = None,
    nan_at: int | None = None,
) -> tuple[object, object]:
    """Train the integration job's model with the Trainer here (a stop request written at `stop_at[1]`,
    a NaN loss at step `nan_at`)."""
    import torch  # noqa: PLC0415
    from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: PLC0415
    from transformers.trainer_utils import get_last_checkpoint  # noqa: PLC0415

    from integration_hf_job import Classifier, Samples  # noqa: PLC0415
    from trainwarden.integrations.transformers import TrainwardenCallback  # noqa: PLC0415

    class Faulty(Classifier):
        bad = False

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            out = super().forward(x, labels)
            return {**out, "loss": out["loss"] * float("nan")} if self.bad else out

    class Requester(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: object, state: object, control: object, **_: object) -> None:
            if stop_at is not None and state.global_step == stop_at[1]:  # type: ignore[attr-defined]
                request(stop_at[0], stop_request="stop-1")
            model.bad = state.global_step == nan_at  # type: ignore[attr-defined]

    torch.manual_seed(0)
    model = Faulty()
    warden = TrainwardenCallback(reporter=Reporter.from_env(control_interval=0.0))  # read every step
    args = TrainingArguments(
        output_dir=str(ckpt),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_steps=10,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Samples(data), callbacks=[Requester(), warden])
    last = get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    return warden, model


@pytest.mark.timeout(240)
def test_hf_stop_request_checkpoints_stops_and_resumes_exactly(tmp_path: Path, no_daemon: Path) -> None:
    """A stop request ends `train` with a `checkpoint-N` holding the callback's state and exit status
    75; `resume_from_checkpoint` then finishes equal to an uninterrupted run, not obeying it again."""
    data = write_data(tmp_path / "data", 60, world=1)
    _, plain = hf_train(data, tmp_path / "plain", 40)
    stopped, _ = hf_train(data, tmp_path / "ckpt", 40, stop_at=(no_daemon, 13))
    assert stopped.exit_status == EXIT_CHECKPOINTED  # type: ignore[attr-defined]
    saved = sorted((tmp_path / "ckpt").glob("checkpoint-*/trainwarden.json"))
    steps = sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in saved)
    assert steps[0] == 10, steps  # the periodic save
    assert steps[-1] > 13, steps  # then the requested one
    newest = tmp_path / "ckpt" / f"checkpoint-{steps[-1]}" / "trainwarden.json"
    state = json.loads(newest.read_text(encoding="utf-8"))
    assert state["interrupt"]["handled"] == ["stop-1"]
    assert state["clipper"] is not None
    resumed, model = hf_train(data, tmp_path / "ckpt", 40)
    assert resumed.exit_status == 0  # type: ignore[attr-defined]
    assert digest(model) == digest(plain)


@pytest.mark.timeout(300)
def test_hf_stop_on_an_epochs_last_step_resumes_exactly(tmp_path: Path, no_daemon: Path) -> None:
    """A stop request at the last step of an epoch (20 steps each) saves `checkpoint-20`; the resumed
    run starts the next epoch with the sampler's order for it and ends equal to an uninterrupted run."""
    data = write_data(tmp_path / "data", 20, world=1)  # 160 samples, 8 a step: 20 steps an epoch
    _, plain = hf_train(data, tmp_path / "plain", 40)
    stopped, _ = hf_train(data, tmp_path / "ckpt", 40, stop_at=(no_daemon, 19))
    assert stopped.exit_status == EXIT_CHECKPOINTED  # type: ignore[attr-defined]
    steps = sorted(int(p.name.removeprefix("checkpoint-")) for p in (tmp_path / "ckpt").glob("checkpoint-*"))
    assert steps == [10, 20], steps
    resumed, model = hf_train(data, tmp_path / "ckpt", 40)
    assert resumed.exit_status == 0  # type: ignore[attr-defined]
    assert digest(model) == digest(plain)


@pytest.mark.timeout(300)
def test_hf_skips_the_update_of_a_step_named_in_skip_batches(tmp_path: Path, no_daemon: Path) -> None:
    """With step 5 named in `skip_batches`, its NaN loss changes no parameter: the run ends finite and
    bit-equal to a clean run that skips the same step; without the skip the NaN ruins the parameters."""
    data = write_data(tmp_path / "data", 60, world=1)
    _, ruined = hf_train(data, tmp_path / "ruined", 12, nan_at=5)
    assert digest(ruined)[1] is False
    skip(no_daemon, 5, 5)
    _, skipped = hf_train(data, tmp_path / "skipped", 12, nan_at=5)
    _, clean = hf_train(data, tmp_path / "clean", 12)
    assert digest(skipped)[1] is True
    assert digest(skipped) == digest(clean)


@pytest.mark.timeout(120)
def test_hf_refuses_its_own_clipping_beside_the_adaptive_one(tmp_path: Path, no_daemon: Path) -> None:
    """`max_grad_norm > 0` with `clip=True` stops `train` before the first step, naming the setting."""
    data = write_data(tmp_path / "data", 5, world=1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        hf_train(data, tmp_path / "ckpt", 3, max_grad_norm=1.0)
