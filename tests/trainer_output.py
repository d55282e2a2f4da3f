"""What every test trainer prints and hashes: protocol lines and a digest of its parameters.

Test instrumentation, not training logic: each trainer (user, FSDP2, local tier, framework jobs) uses
only the documented client API for training and these two functions to tell its test what it did.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from typing import Any


def say(line: str) -> None:
    """One protocol line in one write, so two ranks sharing torchrun's pipe never interleave within it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def state_digest(state: Mapping[str, Any]) -> tuple[str, bool]:
    """sha256 of every tensor's bytes in name order, and whether all are finite."""
    import torch  # noqa: PLC0415 - the trainers import torch anyway; the tests that only read results do not

    sha = hashlib.sha256()
    finite = True
    for name, tensor in sorted(state.items()):
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        finite = finite and bool(torch.isfinite(tensor).all())
    return sha.hexdigest(), finite
