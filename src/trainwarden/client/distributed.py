"""Process-group set-up that survives torchrun's own restarts (`--max-restarts`).

Under torchrun the workers share the agent's TCPStore (`TORCHELASTIC_USE_AGENT_STORE=True`), and
with the static rendezvous (`--master-addr/--master-port`) that one store serves every attempt.
torch 2.13 no longer prefixes the workers' keys by attempt ("We create a new TCPStore for every
retry", `torch.distributed.rendezvous._create_c10d_store`), so after a restart gloo ranks read the
addresses the dead attempt left there: they fail with "connectFullMesh … Connection refused" or
wait in set-up until the process-group timeout. Use this instead of
`torch.distributed.init_process_group` and every attempt gets keys of its own::

    from trainwarden.client.distributed import init_process_group

    init_process_group("gloo")     # or "nccl"; rank and world size from torchrun's environment

Outside torchrun's agent store (a bare `env://` launch, Slurm's srun) it is exactly
`torch.distributed.init_process_group(backend, timeout=...)`.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from typing import Any

AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
ATTEMPT_ENV = "TORCHELASTIC_RESTART_COUNT"
PREFIX = "/trainwarden/attempt_"
DEFAULT_STORE_TIMEOUT = dt.timedelta(minutes=30)  # torch's own default process-group timeout


def uses_agent_store(env: Mapping[str, str] | None = None) -> bool:
    """True when torchrun's agent hosts the store every attempt shares."""
    env = os.environ if env is None else env
    return env.get(AGENT_STORE_ENV) == "True"


def attempt_prefix(env: Mapping[str, str] | None = None) -> str:
    """The store prefix of this attempt: torchrun's restart count (0 for the first attempt)."""
    env = os.environ if env is None else env
    value = env.get(ATTEMPT_ENV, "0").strip()
    return f"{PREFIX}{int(value) if value.isdigit() else 0}"


def launcher_rank(env: Mapping[str, str]) -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the launcher's environment; ValueError naming them when not integers."""
    rank, world = env.get("RANK", ""), env.get("WORLD_SIZE", "")
    if not (rank.isdigit() and world.isdigit() and int(world) > int(rank)):
        raise ValueError(
            f"torchrun's RANK and WORLD_SIZE must be integers, RANK < WORLD_SIZE: {rank=!r} {world=!r}"
        )
    return int(rank), int(world)


def attempt_store(timeout: dt.timedelta | None = None, env: Mapping[str, str] | None = None) -> Any:
    """A client of the agent's store whose keys are prefixed by this attempt; None outside the agent."""
    env = os.environ if env is None else env
    if not uses_agent_store(env):
        return None
    _, world_size = launcher_rank(env)
    port = env.get("MASTER_PORT", "")
    if not env.get("MASTER_ADDR") or not port.isdigit():
        raise ValueError(f"torchrun's MASTER_ADDR and MASTER_PORT are needed for its store: {port=!r}")
    from torch._C._distributed_c10d import PrefixStore, TCPStore  # noqa: PLC0415 - torch only inside the job

    client = TCPStore(
        env["MASTER_ADDR"],
        int(port),
        world_size,
        is_master=False,
        timeout=timeout or DEFAULT_STORE_TIMEOUT,
    )
    return PrefixStore(attempt_prefix(env), client)


def init_process_group(
    backend: str = "gloo",
    *,
    timeout: dt.timedelta | None = None,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> None:
    """`torch.distributed.init_process_group`, with a store of this attempt's own under torchrun.

    Rank and world size come from the launcher's `RANK` and `WORLD_SIZE`; `kwargs` are passed on
    (e.g. `device_id`). Raises `ValueError` naming the variable when the agent's environment lacks
    a rank, world size or store address.
    """
    env = os.environ if env is None else env
    import torch.distributed as dist  # noqa: PLC0415 - torch only inside the job

    store = attempt_store(timeout, env)
    if store is None:
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        return
    rank, world_size = launcher_rank(env)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
