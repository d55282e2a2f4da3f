"""Host buffers that an asynchronous save copies the state into, reused from one save to the next.

A fresh CPU copy of every tensor at every save costs an allocation of the whole state (and, on
first touch, a page fault per 4 KiB page) on the step path: for a 48 MiB state that was most of
a save's blocking time. Here each tensor is copied (``copy_``) into a buffer of the same shape
and dtype kept from the previous save, pinned when the source is on a CUDA device so the
device-to-host copy runs at full speed, as DCP's own async staging does. Two slots: the writer
thread may still be writing one while the next save is staged into the other.

Only plain tensors are staged; a tensor subclass (a DTensor shard, a sharded tensor) is copied
fresh, as before, because its wrapper carries placement metadata a buffer cannot.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SLOTS = 2
"""One slot for the write in flight, one for the save being staged."""

_Path = tuple[Hashable, ...]


class HostStaging:
    """Per slot, the host buffer of every tensor of the last state staged into it, by position."""

    def __init__(self) -> None:
        self._slots: list[dict[_Path, torch.Tensor]] = [{} for _ in range(SLOTS)]

    def stage(self, state: Any, slot: int) -> Any:
        """A copy of `state` with every tensor on the host, in `slot`'s buffers (slot must be free).

        Buffers whose tensor is gone or changed shape/dtype are dropped, so the host memory held is
        one state per slot used, whatever the state did between saves.
        """
        import torch  # noqa: PLC0415

        copier = _Copier(self._slots[slot], torch)
        staged = copier.copy(state, ())
        for device in copier.devices:  # the non-blocking copies into pinned memory must land first
            torch.cuda.synchronize(device)
        self._slots[slot] = copier.fresh
        return staged

    def held_bytes(self) -> int:
        """Host memory held by the buffers of every slot."""
        return sum(t.numel() * t.element_size() for slot in self._slots for t in slot.values())


class _Copier:
    """One staging pass: reuses `old` buffers by position, records those used in `fresh`."""

    def __init__(self, old: dict[_Path, torch.Tensor], torch: Any) -> None:
        self.old = old
        self.fresh: dict[_Path, torch.Tensor] = {}
        self.devices: set[torch.device] = set()
        self.torch = torch

    def copy(self, obj: Any, path: _Path) -> Any:
        torch = self.torch
        if isinstance(obj, torch.Tensor):
            if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.layout != torch.strided:
                return obj.detach().to("cpu", copy=True)
            source = obj.detach()
            buffer = self.old.get(path)
            if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
                buffer = _host_buffer(source)
            pinned = source.device.type == "cuda" and buffer.is_pinned()
            buffer.copy_(source, non_blocking=pinned)
            if pinned:
                self.devices.add(source.device)
            self.fresh[path] = buffer
            return buffer
        if isinstance(obj, Mapping):
            return {key: self.copy(value, (*path, key)) for key, value in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self.copy(value, (*path, i)) for i, value in enumerate(obj))
        return obj


def _host_buffer(source: torch.Tensor) -> torch.Tensor:
    """An uninitialised host tensor like `source`: pinned for a CUDA source where pinning works."""
    import torch  # noqa: PLC0415

    if source.device.type == "cuda":
        try:
            return torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        except RuntimeError:  # pinned memory is limited (containers, ulimit -l): pageable still works
            pass
    return torch.empty(source.shape, dtype=source.dtype)
