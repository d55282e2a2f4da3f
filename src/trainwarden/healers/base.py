"""What a healer is: one kind of action, checked, idempotent, with a dry run that touches nothing.

Healers know nothing of rules; the policy hands them an `Action` and journals the `ActionResult`.
A healer is one file defining a `Healer` subclass exposed as module-level `HEALER`, registered by
one line in `trainwarden.healers.HEALER_MODULES`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from trainwarden.config import PluginOptions
from trainwarden.model import Action, ActionOutcome, ActionResult, Finding, JobView

if TYPE_CHECKING:
    from trainwarden.backends.base import RestartBackend
    from trainwarden.store import Store

# The action types live in the shared model (restart backends, below the healers, answer with
# them too); they are re-exported here, where healers have always imported them from.
__all__ = ["Action", "ActionOutcome", "ActionResult", "Healer", "HealerContext"]


@dataclass(frozen=True)
class HealerContext:
    """What every healer gets: directories and a clock (never the rules).

    Optional, for healers that must observe the job they act on (checkpoint-restart waits for the
    job's checkpoint record): the store, a view of the job's rank processes, and the restart
    backend the daemon itself runs (the `supervise` child of `trainwarden run`).
    """

    runtime_dir: Path = Path("/run/trainwarden")
    state_dir: Path = Path("/var/lib/trainwarden")
    clock: Callable[[], float] = time.time
    store: Store | None = None
    jobs: JobView | None = None
    restart_backend: RestartBackend | None = None


class Healer(abc.ABC):
    """Base of every healer."""

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions, context: HealerContext) -> None:
        self.options = options
        self.context = context

    @abc.abstractmethod
    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:
        """Check state, act if needed (never when `dry_run`), and report what happened."""

    def took_effect(self, action: Action, applied_at: float) -> float | None:
        """When an applied action took effect, or None while it has not (yet).

        The policy acts again on a fault only when the fault was observed *after* this time (it
        persisted or recurred although the action was in effect), and then escalates. Default:
        the moment the healer returned. Healers whose change needs the job's cooperation
        override it: a restart takes effect when the job is back, clipping when the client
        acknowledges the new settings.
        """
        del action
        return applied_at

    def new_fault(self, acted_on: Mapping[str, object], finding: Finding) -> bool:
        """Whether `finding`, a new episode of the rule acted on, is a new fault, not a failed action.

        Within `recurrence_seconds` a new episode is otherwise evidence that the action did not work.

        `acted_on` is the evidence of the finding the action answered. Default: never; a rollback,
        which skips the bad batch, says yes when the new episode's first bad step lies past the old one.
        """
        del acted_on, finding
        return False

    def can_act(self, subject: Mapping[str, str]) -> bool:
        """Whether this healer can act on `subject` at all; the policy skips a rung that cannot.

        Default: yes. A rollback needs the job to have said in its hello that it can roll back.
        """
        del subject
        return True
