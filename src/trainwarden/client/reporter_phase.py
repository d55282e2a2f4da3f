"""The context manager behind `Reporter.phase`: one non-step phase, begin and end records."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Protocol, Self


class _PhaseOwner(Protocol):
    """What a phase block uses of its reporter (a Protocol, so this module needs no import of it)."""

    _phases: list[str]

    def _enqueue(self, record: tuple[Any, ...]) -> None: ...

    def _phase_ended(self, when: float) -> None: ...


class PhaseBlock:
    """Context manager for one non-step phase."""

    __slots__ = ("_name", "_reporter", "_started")

    def __init__(self, reporter: _PhaseOwner, name: str) -> None:
        self._reporter = reporter
        self._name = name
        self._started = 0.0

    def __enter__(self) -> Self:
        self._started = time.perf_counter()
        self._reporter._phases.append(self._name)  # noqa: SLF001
        self._reporter._enqueue(("phase", self._name, "begin", None))  # noqa: SLF001
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ended = time.perf_counter()
        reporter = self._reporter
        stack = reporter._phases  # noqa: SLF001
        if stack and stack[-1] == self._name:
            stack.pop()
        reporter._phase_ended(ended)  # noqa: SLF001
        reporter._enqueue(("phase", self._name, "end", ended - self._started))  # noqa: SLF001
        if stack:  # back in the enclosing phase (e.g. data loading inside eval)
            reporter._enqueue(("phase", stack[-1], "begin", None))  # noqa: SLF001
