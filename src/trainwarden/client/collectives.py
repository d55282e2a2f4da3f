"""Opt-in timing of torch.distributed collectives, so the daemon sees one stuck in flight.

`time_collectives(reporter)` wraps `torch.distributed.all_reduce`, `all_gather`,
`all_gather_into_tensor`, `reduce_scatter`, `reduce_scatter_tensor`, `broadcast`, `all_to_all`
and `barrier`: each call sends a `begin` record (op, bytes, sequence number) before it starts and
an `end` record with its host-side duration when it returns, or, for `async_op=True`, when
`wait()` on the returned work returns. Code must call them as `dist.all_reduce(...)` (or import
the names after enabling), since a name imported earlier still points at the original.

What is timed is the host's view: with gloo that is the collective itself; with NCCL a
synchronous call returns once the kernel is queued, so only `wait()` on async work (and
barrier) measures the network. DDP's gradient buckets call into C++ directly and are not seen.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, Self

OPS: dict[str, str] = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast": "broadcast",
    "all_to_all": "all_to_all",
    "barrier": "barrier",
}
"""torch.distributed function name → the op label the daemon knows."""

_INPUT_ARG: dict[str, tuple[int, str] | None] = {
    "all_reduce": (0, "tensor"),
    "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
    "broadcast": (0, "tensor"),
    "all_to_all": (1, "input_tensor_list"),
    "barrier": None,
}
"""Where each function takes the data this rank contributes: its size is the record's `bytes`."""


class CollectiveSink(Protocol):
    """What the wrappers report to (a `Reporter`)."""

    def collective(self, op: str, event: str, seq: int, nbytes: int | None, seconds: float | None) -> None:
        """Begin or end of one collective."""


def tensor_bytes(*args: Any) -> int:
    """Bytes of every tensor among the arguments (lists of tensors included), without a sync."""
    total = 0
    for arg in args:
        if isinstance(arg, list | tuple):
            total += tensor_bytes(*arg)
        elif hasattr(arg, "element_size") and hasattr(arg, "numel"):
            total += int(arg.numel()) * int(arg.element_size())
    return total


class _TimedWork:
    """Wraps the work handle of an async collective: `wait()` reports the end."""

    def __init__(self, work: Any, on_done: Callable[[], None]) -> None:
        self._work = work
        self._on_done: Callable[[], None] | None = on_done

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._work.wait(*args, **kwargs)
        finally:  # a failed or timed-out wait ends the collective too, or it would look stuck forever
            done, self._on_done = self._on_done, None
            if done is not None:
                done()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class CollectiveTimer:
    """The installed wrappers; `uninstall()` (or leaving the `with` block) restores the originals."""

    def __init__(self, sink: CollectiveSink, dist: Any, names: tuple[str, ...]) -> None:
        self._sink = sink
        self._dist = dist
        self._seq: Iterator[int] = itertools.count()
        self._originals: dict[str, Callable[..., Any]] = {}
        for name in names:
            original = getattr(dist, name, None)
            if original is None or getattr(original, "__trainwarden_timed__", False):
                continue
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        sink = self._sink
        seq_source = self._seq
        op = OPS[name]
        where = _INPUT_ARG[name]

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            seq = next(seq_source)
            nbytes = None
            if where is not None:
                index, keyword = where
                data = args[index] if len(args) > index else kwargs.get(keyword)
                nbytes = tensor_bytes(data)
            sink.collective(op, "begin", seq, nbytes, None)
            started = time.perf_counter()

            def done() -> None:
                sink.collective(op, "end", seq, nbytes, time.perf_counter() - started)

            try:
                work = original(*args, **kwargs)
            except BaseException:
                done()
                raise
            if work is not None and hasattr(work, "wait"):
                return _TimedWork(work, done)
            done()
            return work

        timed.__trainwarden_timed__ = True  # type: ignore[attr-defined]
        return timed

    @property
    def installed(self) -> tuple[str, ...]:
        """Names of the functions this timer wrapped."""
        return tuple(self._originals)

    def uninstall(self) -> None:
        """Put the original functions back."""
        for name, original in self._originals.items():
            setattr(self._dist, name, original)
        self._originals.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def time_collectives(sink: CollectiveSink, names: tuple[str, ...] = tuple(OPS)) -> CollectiveTimer:
    """Wrap the named torch.distributed collectives so each reports begin/end to `sink`."""
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"cannot time {unknown}: known collectives are {sorted(OPS)}")
    import torch.distributed as dist  # noqa: PLC0415 - torch only inside the training process

    return CollectiveTimer(sink, dist, names)
