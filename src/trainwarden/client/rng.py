"""Capture and restore the random number generators a training step draws from.

Exact resume needs every generator back where it was: Python's `random`, NumPy's legacy global
generator, torch's CPU generator and, when CUDA is in use, every device's generator. States are
turned into JSON-able values so they can live in the checkpoint manifest.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Mapping
from dataclasses import dataclass
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


class RngStateError(ValueError):
    """A saved RNG state that cannot be restored; nothing was changed."""


@dataclass(frozen=True)
class PreparedRng:
    """Generator states decoded and checked, ready to apply without any chance of failing midway."""

    python: tuple[Any, ...] | None = None
    torch_cpu: Any = None
    numpy: tuple[Any, ...] | None = None
    cuda: list[Any] | None = None

    def apply(self) -> None:
        """Put every generator back; each state was already accepted by a scratch generator."""
        import torch  # noqa: PLC0415

        if self.python is not None:
            random.setstate(self.python)
        if self.torch_cpu is not None:
            torch.set_rng_state(self.torch_cpu)
        if self.numpy is not None:
            import numpy as np  # noqa: PLC0415

            np.random.set_state(self.numpy)  # noqa: NPY002 - restoring the global generator is the point
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def prepare(state: Mapping[str, Any]) -> PreparedRng:
    """Decode and check `state` (as made by `capture`) without touching any generator.

    Each part is loaded into a scratch generator of its kind first, so garbage is refused here, as
    `RngStateError`, before a checkpoint load changes anything. Missing parts are left alone.
    """
    if not isinstance(state, Mapping):
        raise RngStateError(f"rng state must be an object, got {type(state).__name__}")
    try:
        return PreparedRng(
            python=_python(state.get("python")),
            torch_cpu=None if "torch" not in state else _torch_cpu(state["torch"]),
            numpy=_numpy(state.get("numpy")),
            cuda=_cuda(state.get("cuda")),
        )
    except RngStateError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError, KeyError, IndexError) as exc:
        raise RngStateError(f"rng state unusable: {exc!r}"[:300]) from exc


def restore(state: Mapping[str, Any]) -> None:
    """Put every generator back to `state` (as made by `capture`); missing parts are left alone."""
    prepare(state).apply()


def _python(raw: Any) -> tuple[Any, ...] | None:
    if raw is None:
        return None
    values = raw["state"]
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise RngStateError("python rng state must be a list of integers")
    gauss = raw["gauss"]
    if gauss is not None and type(gauss) is not float:
        raise RngStateError("python rng gauss must be a float or null")
    version = raw["version"]
    if type(version) is not int:
        raise RngStateError("python rng version must be an integer")
    result = (version, tuple(values), gauss)
    random.Random().setstate(result)  # noqa: S311 - a scratch generator: raises on a bad state
    return result


def _torch_cpu(raw: Any) -> Any:
    import torch  # noqa: PLC0415

    tensor = _unb64(raw)
    torch.Generator().set_state(tensor)  # raises on a wrong size
    return tensor


def _numpy(raw: Any) -> tuple[Any, ...] | None:
    if raw is None:
        return None
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:  # saved where numpy was installed; nothing here draws from it
        return None
    keys = raw["keys"]
    if not isinstance(keys, list) or not all(type(k) is int and 0 <= k < 1 << 32 for k in keys):
        raise RngStateError("numpy rng keys must be a list of 32-bit unsigned integers")
    fields = (raw["name"], raw["pos"], raw["has_gauss"], raw["cached_gaussian"])
    if not isinstance(fields[0], str) or type(fields[1]) is not int or type(fields[2]) is not int:
        raise RngStateError("numpy rng name/pos/has_gauss have the wrong types")
    if isinstance(fields[3], bool) or not isinstance(fields[3], int | float):
        raise RngStateError("numpy rng cached_gaussian must be a number")
    result = (fields[0], np.asarray(keys, dtype=np.uint32), fields[1], fields[2], float(fields[3]))
    np.random.RandomState().set_state(result)  # raises on a wrong length or position
    return result


def _cuda(raw: Any) -> list[Any] | None:
    import torch  # noqa: PLC0415

    if raw is None or not torch.cuda.is_available():
        return None
    if not isinstance(raw, list):
        raise RngStateError("cuda rng states must be a list")
    states = [_unb64(s) for s in raw]
    current = torch.cuda.get_rng_state_all()
    if len(states) > len(current) or any(
        s.numel() != c.numel() for s, c in zip(states, current, strict=False)
    ):
        raise RngStateError(f"{len(states)} cuda rng states do not fit the {len(current)} devices here")
    return states


def _b64(tensor: Any) -> str:
    return base64.b64encode(bytes(tensor.cpu().tolist())).decode("ascii")


def _unb64(text: Any) -> Any:
    import torch  # noqa: PLC0415

    if not isinstance(text, str):
        raise RngStateError(f"expected a base64 string, got {type(text).__name__}")
    raw = bytearray(base64.b64decode(text.encode("ascii"), validate=True))
    return torch.frombuffer(raw, dtype=torch.uint8).clone()
