"""The total L2 norm of gradients that may be sharded (FSDP2 / DTensor), the same on every rank.

Replicated gradients (plain tensors, e.g. after DDP's all-reduce) give their norm on each rank as
`torch.nn.utils.get_total_norm` computes it. FSDP2's gradients are DTensors sharded on a 1-D mesh
(`Shard(0)`): each rank holds a disjoint slice, so the squares of the local slices add up to the
square of the global norm, and one all-reduce of that scalar over the mesh's group gives every rank
the same value, on the device and without a host read (the sharded equivalent of what
`clip_grad_norm_` computes for DTensors, which goes through DTensor's dispatch and costs about
3x as much here). Any other layout (a replicated or partial mesh dimension, a 2-D mesh) goes
through `get_total_norm` on the DTensors themselves, which handles every placement.

The squares are summed in float64: a norm of 1e20, already a fault, must stay finite rather
than overflow float32 before the square root.

torch is imported lazily, so importing this module costs nothing in the daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_dtensor_type: list[Any] = []  # [DTensor class or None], looked up once


def _dtensor_class() -> Any:
    """`torch.distributed.tensor.DTensor`, or None when this torch build has no distributed."""
    if not _dtensor_type:
        import torch.distributed as dist  # noqa: PLC0415 - torch is imported lazily on purpose

        if dist.is_available():
            from torch.distributed.tensor import DTensor  # noqa: PLC0415

            _dtensor_type.append(DTensor)
        else:
            _dtensor_type.append(None)
    return _dtensor_type[0]


def local_parts(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors to scale in place: each DTensor's local shard, plain tensors as they are.

    Scaling the local shard by a coefficient every rank agrees on scales the DTensor, without
    DTensor's per-op dispatch (`to_local()` is an autograd function, ~9 µs each, hence the
    attribute when it is there).
    """
    dtensor = _dtensor_class()
    if dtensor is None:
        return grads
    return [_local(g) if isinstance(g, dtensor) else g for g in grads]


def _local(grad: Any) -> Any:
    local = getattr(grad, "_local_tensor", None)
    return grad.to_local() if local is None else local


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """0-d float32 tensor on the gradients' device: the global L2 norm, equal on every rank."""
    import torch  # noqa: PLC0415

    dtensor = _dtensor_class()
    sharded = [g for g in grads if dtensor is not None and isinstance(g, dtensor)]
    if not sharded:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        return norm if norm.dtype == torch.float32 else norm.to(torch.float32)
    plain = [g for g in grads if not isinstance(g, dtensor)]
    squares = _sharded_squares(sharded, torch)
    if plain:  # replicated beside the shards: every rank holds the same copy, counted once
        local = torch.nn.utils.get_total_norm(plain, norm_type=2.0).to(torch.float64)
        squares = squares + (local * local).to(squares.device)
    result: torch.Tensor = squares.sqrt().to(torch.float32)
    return result


def _sharded_squares(grads: list[Any], torch: Any) -> Any:
    """Sum of squares of all sharded gradients, reduced across ranks (float64, 0-d, local)."""
    import torch.distributed as dist  # noqa: PLC0415

    by_mesh: dict[Any, list[Any]] = {}  # equal meshes (each fully_shard call makes one) are one group
    other: list[Any] = []
    for g in grads:
        mesh = g.device_mesh
        if mesh.ndim == 1 and all(p.is_shard() for p in g.placements):
            by_mesh.setdefault(mesh, []).append(g)
        else:
            other.append(g)
    total = None
    for mesh, group in by_mesh.items():
        local = torch.nn.utils.get_total_norm(local_parts(group), norm_type=2.0).to(torch.float64)
        square = local * local
        dist.all_reduce(square, op=dist.ReduceOp.SUM, group=mesh.get_group())
        total = square if total is None else total + square
    if other:
        # DTensor computes the reduction each placement needs; full_tensor() is then a local read.
        norm = torch.nn.utils.get_total_norm(other, norm_type=2.0).full_tensor().to(torch.float64)
        total = norm * norm if total is None else total + (norm * norm).to(total.device)
    return total
