"""The checkpoint's own process group and the few object collectives it uses.

A gloo group of its own: checkpoint traffic (possibly from the writer thread) never interleaves
with the training's collectives, and works whatever the training backend is. With the local tier a
second one carries the step-path agreement (`any_rank`) while the writer thread uses the first. Without
torch.distributed every call is the single-process identity.
"""

from __future__ import annotations

from typing import Any


class CheckpointGroup:
    """Rank, world size and object collectives on a dedicated gloo group (or none)."""

    def __init__(self, *, flags: bool = False) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        self.distributed = dist.is_available() and dist.is_initialized()
        self.group: Any = None
        self._flags: Any = None
        self.rank, self.world_size = 0, 1
        if self.distributed:
            self.group = dist.new_group(backend="gloo")
            if flags:  # a second group: the writer thread may be using the first one meanwhile
                self._flags = dist.new_group(backend="gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any: one all-reduce of one integer.

        On the flags group (``flags=True``), from the caller's thread, never the writer's.
        """
        if not self.distributed or self.world_size == 1:
            return flag
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        assert self._flags is not None, "CheckpointGroup(flags=True) is needed for any_rank"
        box = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self._flags)
        return bool(box.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            import torch.distributed as dist  # noqa: PLC0415

            dist.barrier(group=self.group)

    def gather(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's `obj` on rank 0 (an empty list elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist  # noqa: PLC0415

        out: list[Any] = [None] * self.world_size if self.rank == 0 else []
        dist.gather_object(obj, out if self.rank == 0 else None, dst=0, group=self.group)
        return out

    def gather_all(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by rank, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist  # noqa: PLC0415

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist  # noqa: PLC0415

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
