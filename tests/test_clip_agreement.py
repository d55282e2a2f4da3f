"""Clip settings from the daemon are taken at the same step on every rank (`Boundary.clip`).

With replicated (DDP) gradients, two ranks clipping one step apart would apply different updates to
the same weights and the replicas would drift apart for the rest of the run. Each rank reads the
control file on its own; `PlannedInterrupt.at_boundary` agrees on the settings at its sync points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import free_port
from trainwarden.client.interrupt import PlannedInterrupt, clip_fingerprint
from trainwarden.control import ClipSettings, ControlState

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from trainwarden.client.interrupt import PlannedInterrupt
    from trainwarden.control import ClipSettings, ControlState

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sees_new_at, sync_every = json.loads(sys.argv[1])[rank], int(sys.argv[2])
    step = 0
    def source():
        # This rank's own read of the control file: the tightened settings from its own step on.
        if step >= sees_new_at:
            return ControlState(job="j", clip=ClipSettings(z_threshold=2.0))
        return ControlState(job="j")
    guard = PlannedInterrupt((), control=source, sync_every=sync_every)
    seen = []
    for step in range(12):
        boundary = guard.at_boundary(step)
        own = boundary.control.clip if boundary.control is not None else None
        agreed = boundary.clip
        seen.append([own and own.z_threshold, agreed and agreed.z_threshold])
    dist.destroy_process_group()
    print(json.dumps(seen))
    """
)


def _run_two_ranks(tmp_path: Path, sees_new_at: list[int], sync_every: int) -> list[list[list[float | None]]]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    procs = []
    for rank in range(2):
        env = os.environ | {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), json.dumps(sees_new_at), str(sync_every)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    return results


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("sync_every", "agreed_from"), [(1, 6), (4, 8)])
def test_ranks_reading_new_clip_settings_steps_apart_take_them_at_the_same_step(
    tmp_path: Path, sync_every: int, agreed_from: int
) -> None:
    """Rank 0 reads the change at step 2, rank 1 at step 6: both take it at the first common sync point."""
    ranks = _run_two_ranks(tmp_path, [2, 6], sync_every)
    own = [[s[0] for s in seen] for seen in ranks]
    agreed = [[s[1] for s in seen] for seen in ranks]
    assert own[0][2] == 2.0, "rank 0 reads the change at step 2"
    assert own[1][2] is None, "rank 1 does not yet: each rank's own read differs for a while"
    expected = [None] * agreed_from + [2.0] * (12 - agreed_from)
    assert agreed == [expected, expected]


def test_one_process_takes_new_clip_settings_at_once() -> None:
    """Without a process group there is nobody to agree with: the read is the agreed value."""
    state = ControlState(job="j")

    def source() -> ControlState:
        return state

    guard = PlannedInterrupt((), control=source)
    assert guard.at_boundary(0).clip is None
    state = ControlState(job="j", clip=ClipSettings(z_threshold=1.5))
    boundary = guard.at_boundary(1)
    assert boundary.clip == ClipSettings(z_threshold=1.5)
    assert guard.at_boundary(2) is guard.at_boundary(3), "a quiet boundary is reused, not rebuilt"


def test_clip_fingerprint_is_equal_exactly_for_equal_settings() -> None:
    """The same settings give the same digest (2 and 2.0 alike); any changed field changes it."""
    base = ClipSettings()
    assert clip_fingerprint(None) == 0
    assert clip_fingerprint(base) == clip_fingerprint(ClipSettings())
    assert clip_fingerprint(ClipSettings(z_threshold=2)) == clip_fingerprint(ClipSettings(z_threshold=2.0))
    changed = [
        ClipSettings(z_threshold=2.4),
        ClipSettings(ema_alpha=0.98),
        ClipSettings(warmup_steps=26),
        ClipSettings(warmup_max_norm=float("inf")),
        ClipSettings(skip_z_threshold=9.0),
        ClipSettings(max_consecutive_skips=4),
    ]
    digests = {clip_fingerprint(s) for s in changed}
    assert len(digests) == len(changed)
    assert clip_fingerprint(base) not in digests
    assert all(0 < d < 2**63 for d in digests), "it must fit the int64 all-reduce"
