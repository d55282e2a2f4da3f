"""Checkpoints that resume exactly and never load half-written.

Layout under the checkpoint root (one root per job, on a filesystem every rank can see)::

    step_0000000120/
        state/            torch.distributed.checkpoint output: each rank's shard + .metadata
        manifest.json     written last by rank 0 (see `trainwarden.client.manifest`)
    .tmp-step_0000000140/ a save in progress: never loaded, removed by the next save

A save writes everything into the temp directory (files fsynced by DCP's writer), rank 0 checks
sizes and sha256 of every file, writes the manifest, fsyncs it and the directories, renames the
temp directory to its final name and fsyncs the root. A kill at any moment leaves either the
previous set of checkpoints or the new complete one. On load, rank 0 validates the newest
candidate (manifest format, self-checksum, every file's size and digest); all ranks load it
with DCP and agree that it worked, or fall back together to the previous one.

Every rank must construct the manager (it creates a gloo process group for checkpoint traffic, so
an asynchronous save never interleaves with the training's collectives) and call `save` and
`load_latest` at the same step.

The parts live beside this module, one job each: `checkpoint_state` (state helpers,
`ModelOptimizerState`), `checkpoint_group` (the gloo group), `checkpoint_store` (one directory:
validate, publish, prune) and `checkpoint_writer` (one write, the writer thread).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from trainwarden.client import rng
from trainwarden.client.checkpoint_group import CheckpointGroup
from trainwarden.client.checkpoint_state import (
    ModelOptimizerState,
    cpu_copy,
    json_copy,
    quiet_single_process,
    resolve_state,
)
from trainwarden.client.checkpoint_store import STATE_DIR, CheckpointDirectory
from trainwarden.client.checkpoint_writer import SaveJob, SaveThread, write_coordinated
from trainwarden.client.finite import nonfinite_tensors
from trainwarden.client.manifest import MANIFEST_NAME, MAX_STEP, CheckpointError, Manifest, read_manifest

__all__ = ["STATE_DIR", "CheckpointError", "CheckpointManager", "ModelOptimizerState", "ResumePoint"]

log = logging.getLogger(__name__)


class CheckpointReporter(Protocol):
    """What the manager uses of `trainwarden.client.reporter.Reporter` (any object with these)."""

    def phase(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """Context manager marking a phase."""
        ...

    def checkpoint_saved(self, step: int, path: str, seconds: float | None = None) -> Any:
        """Report a completed checkpoint."""
        ...


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where to resume: the step saved, this rank's data position and the saved extras."""

    step: int
    path: Path
    data_position: Any
    extras: Mapping[str, Any]
    local: Mapping[str, Any]
    manifest: Manifest = field(repr=False)


class CheckpointManager:
    """Save, prune and load checkpoints of one job; see the module docstring for guarantees.

    `state` passed to `save`/`load_latest` maps names to tensors, nested dicts of tensors, or
    objects with ``state_dict()``/``load_state_dict()`` (modules, schedulers,
    `ModelOptimizerState`). Small per-rank values (data position, `local`) and job-wide `extras`
    go into the manifest as JSON.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        keep_last: int = 3,
        keep_best: int = 0,
        best_mode: Literal["min", "max"] = "min",
        async_save: bool = False,
        reporter: CheckpointReporter | None = None,
        on_written: Callable[[Path], None] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        if keep_best < 0:
            raise ValueError(f"keep_best={keep_best} must be >= 0")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r} must be 'min' or 'max'")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_mode = best_mode
        self.async_save = async_save
        self.reporter = reporter
        # Called after the shards are written and before the manifest: fault injection in tests.
        self._on_written = on_written
        self.rejected: Counter[str] = Counter()
        """Checkpoints refused on load, by `CheckpointError.reason`."""
        self.failed_saves = 0
        self.last_error: BaseException | None = None
        self.refused_saves = 0
        """Saves refused because parameters or optimizer state held NaN/Inf (nothing was written)."""
        self.last_refusal: CheckpointError | None = None
        self._durable = CheckpointDirectory(
            self.root, keep_last=keep_last, keep_best=keep_best, best_mode=best_mode
        )
        self._writer = SaveThread()
        self._group = CheckpointGroup()
        self.rank, self.world_size = self._group.rank, self._group.world_size
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # --- saving -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        data_position: Any = None,
        extras: Mapping[str, Any] | None = None,
        local: Mapping[str, Any] | None = None,
        metric: float | None = None,
    ) -> Path | None:
        """Save `state` as the checkpoint of `step`; returns its final path, or None when refused.

        A checkpoint never holds non-finite state: when any rank's parameters, optimizer state or
        plain tensors in `state` hold a NaN or Inf, every rank refuses the save together, nothing is
        written, `refused_saves` and `last_refusal` say why, and None is returned, so the newest
        checkpoint stays one from before the fault (the check costs one device sync, here only).
        Synchronous by default. With ``async_save`` the state is copied to CPU here and written on
        a thread; a previous save still in flight is waited for first (never two at once).
        `data_position`, `local` and `extras` must be JSON-able.
        """
        given = step
        try:  # numpy and 0-d integer tensors are fine; a bool or a float is a bug in the caller
            step = -1 if isinstance(step, bool) else operator.index(step)
        except TypeError:
            step = -1
        if not 0 <= step <= MAX_STEP:
            raise ValueError(f"step={given!r} must be an integer in [0, {MAX_STEP}]")
        self._join()  # first: the check below is a collective on the group the writer thread uses
        refusal = self._nonfinite_refusal(step, state)
        if refusal is not None:
            self.refused_saves += 1
            self.last_refusal = refusal
            log.error("checkpoint not saved: %s", refusal)
            return None
        final = self._durable.final(step)
        with self._phase():
            started = time.monotonic()
            resolved = resolve_state(state)
            rank_state = {
                "rank": self.rank,
                "rng": rng.capture(),
                "data_position": json_copy(data_position, "data_position"),
                "local": json_copy(dict(local or {}), "local"),
            }
            job_extras = json_copy(dict(extras or {}), "extras")
            metric_value = None if metric is None or not math.isfinite(float(metric)) else float(metric)
            job = SaveJob(step, resolved, rank_state, job_extras, metric_value, started)
            if not self.async_save:
                self._write(job)
                return final
            job = replace(job, state=cpu_copy(resolved))
        self._writer.start(lambda: self._write(job), final, name=f"trainwarden-ckpt-{step}")
        return final

    def _nonfinite_refusal(self, step: int, state: Mapping[str, Any]) -> CheckpointError | None:
        """A refusal when any rank's state holds NaN/Inf (all ranks agree), else None."""
        bad = nonfinite_tensors(state)
        ranks_bad = [(r, names) for r, names in enumerate(self._group.gather_all(bad)) if names]
        if not ranks_bad:
            return None
        rank, names = ranks_bad[0]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        detail = (
            f"rank {rank} holds non-finite values in {shown}; the newest checkpoint stays the last finite one"
        )
        return CheckpointError(self._durable.final(step), "nonfinite", detail)

    def wait(self) -> Path | None:
        """Wait for an asynchronous save; return its path, or raise `CheckpointError` if it failed."""
        pending = self._writer.pending
        self._join()
        error = self._writer.take_error()
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(pending or self.root, "save_failed", f"asynchronous save failed: {error!r}")
        return pending

    def close(self) -> None:
        """Wait for any save in flight (errors are logged, not raised)."""
        try:
            self.wait()
        except CheckpointError as exc:
            log.error("checkpoint save failed: %s", exc)  # noqa: TRY400 - the message is the whole story

    def _join(self) -> None:
        self._writer.join()

    def _write(self, job: SaveJob) -> None:
        try:
            final = write_coordinated(job, self._durable, self._group, self._on_written)
        except BaseException as exc:
            self.failed_saves += 1
            self.last_error = exc
            raise
        seconds = time.monotonic() - job.started
        log.info("checkpoint step %d saved to %s in %.3f s", job.step, final, seconds)
        if self.reporter is not None:
            try:
                self.reporter.checkpoint_saved(job.step, str(final), seconds=seconds)
            except Exception:
                log.exception("reporter.checkpoint_saved failed (ignored)")

    # --- loading ------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories by name, newest first (complete or not; temp dirs excluded)."""
        return [path for _, path in self._durable.candidates()]

    def validate(self, path: Path) -> Manifest:
        """Check one checkpoint fully (manifest and every file); raise `CheckpointError`."""
        return self._durable.validate(path)

    def load_latest(self, state: Mapping[str, Any], *, restore_rng: bool = True) -> ResumePoint | None:
        """Load the newest valid checkpoint into `state` (in place); None when there is none.

        Invalid checkpoints are logged, counted in `rejected` and skipped. Every rank ends on the
        same checkpoint. RNG states are restored for this rank when the world size is unchanged.
        Everything is checked before anything is changed: the manifest and every file (rank 0),
        then each rank's RNG state, decoded into scratch generators; only then does DCP load the
        tensors in place. A DCP failure (its `CheckpointException` is a `BaseException`, e.g. when
        the model's shapes changed) is a ``load_failed`` refusal and the previous one is tried.
        """
        self._join()
        group = self._group
        for _, path in group.broadcast(self._durable.candidates() if self.rank == 0 else None):
            problem: CheckpointError | None = None
            if self.rank == 0:
                try:
                    self.validate(path)
                except CheckpointError as exc:
                    problem = exc
            problem = group.broadcast(problem)
            if problem is not None:
                self._reject(problem)
                continue
            prepared: rng.PreparedRng | None = None
            try:
                manifest = read_manifest(path)
                prepared = self._prepared_rng(path, manifest) if restore_rng else None
                error: CheckpointError | None = None
            except CheckpointError as exc:
                error = exc
            if self._agreed_failure(error) or self._agreed_failure(self._dcp_load(state, path)):
                continue
            if prepared is not None:
                prepared.apply()
            return self._resume_point(path, manifest)
        return None

    def _dcp_load(self, state: Mapping[str, Any], path: Path) -> CheckpointError | None:
        """Load the tensors of `path` into `state` in place; the failure as a refusal, never raised."""
        from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load  # noqa: PLC0415

        try:
            with quiet_single_process():
                dcp_load(
                    dict(state),
                    checkpoint_id=path / STATE_DIR,
                    process_group=self._group.group,
                    no_dist=not self._group.distributed,
                )
        except CheckpointError as exc:
            return exc
        except (Exception, CheckpointException) as exc:
            return CheckpointError(path / STATE_DIR, "load_failed", f"cannot load state: {exc!r}"[:2000])
        return None

    def _agreed_failure(self, error: CheckpointError | None) -> bool:
        """True (and the first error counted) when any rank failed: all ranks then move on together."""
        errors = [e for e in self._group.gather_all(error) if e is not None]
        if errors:
            self._reject(errors[0])
        return bool(errors)

    def _prepared_rng(self, path: Path, manifest: Manifest) -> rng.PreparedRng | None:
        """The saved RNG state of our rank, decoded and checked; None when it is not restored."""
        mine = manifest.rank_state(self.rank) if manifest.world_size == self.world_size else None
        if mine is None:
            return None
        try:
            return rng.prepare(mine.rng)
        except rng.RngStateError as exc:
            raise CheckpointError(path / MANIFEST_NAME, "bad_rng", f"rank {self.rank}: {exc}") from exc

    def _resume_point(self, path: Path, manifest: Manifest) -> ResumePoint:
        mine = manifest.rank_state(self.rank) if manifest.world_size == self.world_size else None
        if mine is None:
            log.warning(
                "checkpoint %s was saved with world size %d, now %d: RNG states and data positions "
                "are not restored",
                path,
                manifest.world_size,
                self.world_size,
            )
        if manifest.migrated_from is not None:
            log.info("checkpoint %s migrated from format %d", path, manifest.migrated_from)
        log.info("resuming from checkpoint step %d at %s", manifest.step, path)
        return ResumePoint(
            step=manifest.step,
            path=path,
            data_position=None if mine is None else mine.data_position,
            extras=manifest.extras,
            local={} if mine is None else mine.local,
            manifest=manifest,
        )

    def _reject(self, problem: CheckpointError) -> None:
        self.rejected[problem.reason] += 1
        log.warning("skipping checkpoint: %s", problem)

    # --- helpers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _phase(self) -> Iterator[None]:
        phase = getattr(self.reporter, "phase", None)
        if phase is None:
            yield
            return
        try:
            context = phase("checkpoint")
            context.__enter__()
        except Exception:
            log.exception("reporter.phase failed (ignored)")
            yield
            return
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                context.__exit__(None, None, None)
