"""How a step record becomes one wire frame, and how device values wait for their host copy.

Kept apart from the reporter so the hot encoding (about 2x cheaper than json.dumps) can be read
and tested on its own.
"""

from __future__ import annotations

from typing import Any

from trainwarden.protocol import HEADER, wire_float


class Pending:
    """Tensor values copied to pinned host memory; readable once `event` has completed."""

    __slots__ = ("event", "tensors")

    def __init__(self, tensors: dict[int, Any], event: Any) -> None:
        self.tensors = tensors
        self.event = event

    def ready(self) -> bool:
        """True once the device copy has landed (never blocks)."""
        return bool(self.event.query())


PLAIN = frozenset({type(None), float, int})


_PACK = HEADER.pack


def _signal_text(value: Any) -> str:
    number = float(value)  # also turns numpy scalars and bools into plain floats
    return repr(number) if number - number == 0.0 else f'"{wire_float(number)}"'  # inf-inf is NaN


def _count_text(value: Any) -> str | None:
    number = float(value)
    return repr(number) if number - number == 0.0 and number >= 0.0 else None


def step_frame(record: tuple[Any, ...], dropped: int) -> bytes:
    """Encode a step record as one frame without json.dumps (about 2x cheaper, same strict JSON).

    `repr` of a finite float is valid JSON; a non-finite loss or grad-norm travels as a string
    (see `protocol.wire_float`); a non-finite or negative lr, samples or tokens is left out.
    """
    _, step, seconds, loss, grad_norm, lr, samples, tokens, _pending = record
    text = f'{{"type":"step","step":{int(step)},"dropped":{int(dropped)}'
    if seconds is not None:
        text += f',"step_seconds":{float(seconds)!r}'
    if loss is not None:
        text += f',"loss":{_signal_text(loss)}'
    if grad_norm is not None:
        text += f',"grad_norm":{_signal_text(grad_norm)}'
    if lr is not None and (value := _count_text(lr)) is not None:
        text += f',"lr":{value}'
    if samples is not None and (value := _count_text(samples)) is not None:
        text += f',"samples":{value}'
    if tokens is not None and (value := _count_text(tokens)) is not None:
        text += f',"tokens":{value}'
    body = (text + "}").encode()
    return _PACK(len(body)) + body


def copy_to_host(values: dict[int, Any]) -> Pending:
    """Start non-blocking device→pinned-host copies and record an event after them."""
    import torch  # noqa: PLC0415 - only reached when the caller already uses device tensors

    hosts: dict[int, Any] = {}
    device = None
    for i, value in values.items():
        src = value.detach()
        device = src.device
        # Pinned memory makes the copy truly asynchronous; the caching host allocator reuses it.
        host = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
        host.copy_(src, non_blocking=True)
        hosts[i] = host
    event = torch.Event(device=device)  # device-agnostic (cuda, xpu, ...): query() never blocks
    event.record()
    return Pending(hosts, event)
