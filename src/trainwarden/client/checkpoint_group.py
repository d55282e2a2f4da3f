"""The checkpoint's own process group and the few object collectives it uses.

A gloo group of its own: checkpoint traffic (possibly from the writer thread) never interleaves
with the training's collectives, and works whatever the training backend is. Without
torch.distributed every call is the single-process identity.
"""

from __future__ import annotations

from typing import Any


class CheckpointGroup:
    """Rank, world size and object collectives on a dedicated gloo group (or none)."""

    def __init__(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        self.distributed = dist.is_available() and dist.is_initialized()
        self.group: Any = None
        self.rank, self.world_size = 0, 1
        if self.distributed:
            self.group = dist.new_group(backend="gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

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
