"""Which tensors of a checkpoint's state hold NaN or Inf: a checkpoint must never keep them.

Checked: module parameters, optimizer state (moments, ...) and plain tensors given in the state
mapping. Module buffers are not: an attention mask may hold -inf by design, and refusing every
save of such a model would do more harm than the check prevents.

One norm per tensor on its own device and one host read per device (plus an exact min/max of any
tensor whose norm is not finite), so the check synchronises once, at a save, never in a step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names (``train.model.0.weight``, ``train.optim0.state[3].exp_avg`` …) of tensors holding NaN/Inf."""
    import torch  # noqa: PLC0415 - torch is imported lazily on purpose

    by_device: dict[Any, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in _checked(state, torch, ""):
        by_device.setdefault(tensor.device, []).append((name, tensor))
    bad: list[str] = []
    for group in by_device.values():
        # A norm is one fast vectorised pass and is non-finite whenever an element is; it can also
        # overflow on large finite values, so a non-finite norm is confirmed exactly (min and max).
        norms = torch.stack([torch.linalg.vector_norm(t).to(torch.float32) for _, t in group])
        suspects = [i for i, ok in enumerate(torch.isfinite(norms).cpu().tolist()) if not ok]
        bad.extend(group[i][0] for i in suspects if not _all_finite(group[i][1], torch))
    return bad


def _all_finite(tensor: Any, torch: Any) -> bool:
    """Exact check: min and max propagate NaN and show an Inf of either sign."""
    values = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _checked(value: Any, torch: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for each floating tensor the check covers, found by walking `value`."""
    if hasattr(value, "model") and hasattr(value, "optimizers"):  # ModelOptimizerState
        yield from _checked(value.model, torch, f"{prefix}model.")
        for i, optimizer in enumerate(value.optimizers):
            yield from _checked(optimizer, torch, f"{prefix}optim{i}.")
    elif isinstance(value, torch.nn.Module):
        for name, param in value.named_parameters():
            yield from _checked(param.detach(), torch, f"{prefix}{name}")
    elif isinstance(value, torch.optim.Optimizer):
        for i, param_state in enumerate(value.state.values()):
            yield from _checked(param_state, torch, f"{prefix}state[{i}].")
    elif isinstance(value, torch.Tensor):
        if hasattr(value, "to_local"):  # a DTensor (FSDP2): each rank checks its own shard, ranks then agree
            value = value.detach().to_local()
        if (value.is_floating_point() or value.is_complex()) and value.numel():
            yield prefix.rstrip("."), value.detach()
    else:
        yield from _checked_container(value, torch, prefix)


def _checked_container(value: Any, torch: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _checked(item, torch, f"{prefix}{key}.")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _checked(item, torch, f"{prefix}{i}.")
