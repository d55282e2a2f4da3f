"""Turning what a training loop holds into what a checkpoint writer can take, and back.

`ModelOptimizerState` goes through DCP's ``get_state_dict``/``set_state_dict`` (DDP/FSDP prefixes,
sharded tensors, empty optimizer state initialised for a fresh optimizer); the helpers resolve
stateful objects to state dicts and check that the small per-rank values are JSON (the copy off
the device for an asynchronous write is `checkpoint_staging`'s).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ModelOptimizerState:
    """Stateful wrapper that saves a model and its optimizers through DCP's state-dict helpers.

    ``get_state_dict``/``set_state_dict`` handle DDP/FSDP prefixes and sharded tensors, and
    initialise empty optimizer state so a fresh optimizer can be loaded into.
    """

    def __init__(self, model: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state (sharded where the model is)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415

        model_sd, optim_sd = get_state_dict(self.model, list(self.optimizers))
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict` produced."""
        from torch.distributed.checkpoint.state_dict import set_state_dict  # noqa: PLC0415

        set_state_dict(
            self.model,
            list(self.optimizers),
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


def resolve_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Replace stateful objects by their state dicts (DCP would do this too; we need it to snapshot)."""
    return {
        key: value.state_dict()
        if hasattr(value, "state_dict") and hasattr(value, "load_state_dict")
        else value
        for key, value in state.items()
    }


def json_copy(value: Any, what: str) -> Any:
    """A JSON round-trip copy of `value`; ValueError naming `what` when it is not JSON-able."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {what} must be JSON-able: {exc}") from exc


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes a single process" when there is no process group: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        yield
