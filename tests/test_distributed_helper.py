"""The per-attempt process-group helper: keys of each torchrun attempt apart, the plain call elsewhere
(its real use, torchrun's agent restarting workers, is in test_heal_torchrun.py)."""

from __future__ import annotations

import datetime as dt

import pytest
import torch.distributed as dist

from support import free_port
from trainwarden.client.distributed import attempt_prefix, attempt_store, init_process_group, uses_agent_store


def test_prefix_follows_torchruns_restart_count() -> None:
    """Each attempt has its own prefix; a missing or garbled count is the first attempt."""
    assert attempt_prefix({"TORCHELASTIC_RESTART_COUNT": "2"}) == "/trainwarden/attempt_2"
    assert attempt_prefix({}) == "/trainwarden/attempt_0"
    assert attempt_prefix({"TORCHELASTIC_RESTART_COUNT": "x"}) == "/trainwarden/attempt_0"
    assert uses_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert not uses_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "False"})
    assert attempt_store(env={}) is None


def test_two_attempts_on_one_agent_store_do_not_see_each_others_keys() -> None:
    """Keys attempt 0 wrote through the helper's store are invisible to attempt 1 on the same agent store."""
    from torch._C._distributed_c10d import TCPStore  # noqa: PLC0415 - as the agent hosts it

    port = free_port()
    agent = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    first = attempt_store(
        dt.timedelta(seconds=10), {**env, "RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "0"}
    )
    second = attempt_store(
        dt.timedelta(seconds=10), {**env, "RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    )
    first.set("rank0_address", "dead-attempt")
    assert not second.check(["rank0_address"])
    assert first.get("rank0_address") == b"dead-attempt"
    del agent


def test_init_without_rank_in_the_agent_store_environment_names_the_problem() -> None:
    """Under the agent store, RANK and WORLD_SIZE must be integers; the error says so."""
    env = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    with pytest.raises((ValueError, KeyError)):
        init_process_group("gloo", timeout=dt.timedelta(seconds=2), env=env)
    assert not dist.is_initialized()
