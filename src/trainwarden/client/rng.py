"""Capture and restore the random number generators a training step draws from.

Exact resume needs every generator back where it was: Python's `random`, NumPy's legacy global
generator, torch's CPU generator and, when CUDA is in use, every device's generator. States are
turned into JSON-able values so they can live in the checkpoint manifest.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Mapping
from typing import Any


def capture() -> dict[str, Any]:
    """The current state of every generator we know about, as JSON-able values."""
    import torch  # noqa: PLC0415 - torch is imported lazily on purpose

    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "torch": _b64(torch.get_rng_state()),
    }
    numpy_state = _numpy_state()
    if numpy_state is not None:
        name, keys, pos, has_gauss, cached = numpy_state
        state["numpy"] = {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _numpy_state() -> Any:
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:  # numpy is optional for the client
        return None
    return np.random.get_state(legacy=True)  # noqa: NPY002 - the user's global generator is what we save


def restore(state: Mapping[str, Any]) -> None:
    """Put every generator back to `state` (as made by `capture`); missing parts are left alone."""
    import torch  # noqa: PLC0415

    py = state.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"]))
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    np_state = state.get("numpy")
    if np_state is not None:
        import numpy as np  # noqa: PLC0415

        keys = np.asarray(np_state["keys"], dtype=np.uint32)
        np.random.set_state(  # noqa: NPY002 - restoring the global generator is the point
            (
                np_state["name"],
                keys,
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["cached_gaussian"]),
            )
        )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


def _b64(tensor: Any) -> str:
    return base64.b64encode(bytes(tensor.cpu().tolist())).decode("ascii")


def _unb64(text: str) -> Any:
    import torch  # noqa: PLC0415

    raw = bytearray(base64.b64decode(text.encode("ascii"), validate=True))
    return torch.frombuffer(raw, dtype=torch.uint8).clone()
