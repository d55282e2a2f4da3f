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
an asynchronous save never interleaves with the training's collectives) the same way and call
`save` and `load_latest` at the same step.

With ``local_dir`` a second, node-local tier is written more often (`checkpoint_local`); `save`
decides per call which tier is due, and `load_latest` takes the newest step every rank can load
from either tier. A local save due while a write is still in flight on any rank is skipped on
every rank (agreed by one all-reduce, so the ranks' local steps stay the same), never waited for.

The parts live beside this module, one job each: `checkpoint_state` (state helpers,
`ModelOptimizerState`), `checkpoint_staging` (the reused host buffers an asynchronous save copies
into), `checkpoint_group` (the gloo groups), `checkpoint_store` (one directory:
validate, publish, prune), `checkpoint_writer` (one write, the writer thread), `checkpoint_local`
(the node-local tier), `checkpoint_resume` (the `ResumePoint`) and `checkpoint_report`.
"""

# Over 450 lines (issue 12): one manager owns the groups, the writer and both tiers, because a save
# and a load must agree across ranks on all three; the next split is the load path (`load_latest` and
# its durable/local loaders) into a module of its own.

from __future__ import annotations

import logging
import operator
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from trainwarden.client import rng
from trainwarden.client.checkpoint_group import CheckpointGroup
from trainwarden.client.checkpoint_local import LocalTier, default_local_dir
from trainwarden.client.checkpoint_report import CheckpointReporter, checkpoint_phase, report_saved
from trainwarden.client.checkpoint_resume import ResumePoint, prepared_rng, resume_point
from trainwarden.client.checkpoint_staging import SLOTS, HostStaging
from trainwarden.client.checkpoint_state import ModelOptimizerState, quiet_single_process
from trainwarden.client.checkpoint_store import STATE_DIR, CheckpointDirectory
from trainwarden.client.checkpoint_writer import (
    SaveInputs,
    SaveJob,
    SaveThread,
    capture,
    write_coordinated,
    write_private,
)
from trainwarden.client.finite import nonfinite_tensors
from trainwarden.client.manifest import MAX_STEP, CheckpointError, Manifest, read_manifest

__all__ = [
    "STATE_DIR",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointReporter",
    "ModelOptimizerState",
    "ResumePoint",
    "default_local_dir",
]

log = logging.getLogger(__name__)


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
        durable_every: int = 1,
        local_dir: Path | str | None = None,
        local_every: int = 1,
        local_keep_last: int = 2,
        local_when_busy: Literal["skip", "wait"] = "skip",
    ) -> None:
        if durable_every < 1:
            raise ValueError(f"durable_every={durable_every} must be >= 1")
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        if keep_best < 0:
            raise ValueError(f"keep_best={keep_best} must be >= 0")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r} must be 'min' or 'max'")
        if local_when_busy not in ("skip", "wait"):
            raise ValueError(f"local_when_busy={local_when_busy!r} must be 'skip' or 'wait'")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_mode = best_mode
        self.async_save = async_save
        self.durable_every = durable_every
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
        self.local_when_busy = local_when_busy
        self.local_skipped = 0
        """Local saves skipped, on every rank together, because a write was still in flight on one."""
        self.local_wait_seconds = 0.0
        """Time local saves waited for the previous write (``local_when_busy="wait"`` only)."""
        self._durable = CheckpointDirectory(
            self.root, keep_last=keep_last, keep_best=keep_best, best_mode=best_mode
        )
        self._writer = SaveThread()
        self._staging = HostStaging()
        self._group = CheckpointGroup(flags=local_dir is not None)
        self.rank, self.world_size = self._group.rank, self._group.world_size
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        self._local_configured = local_dir is not None
        self._local_every = local_every
        self.local_tier_error: OSError | None = None
        """Why this rank's local tier could not be created (it then saves to the durable tier only)."""
        self._local = None if local_dir is None else self._local_tier(Path(local_dir), local_keep_last)

    def _local_tier(self, local_dir: Path, keep_last: int) -> LocalTier | None:
        """The local tier of this rank; None (and `local_tier_error` set) when its storage is unusable."""
        tier = LocalTier(
            local_dir,
            rank=self.rank,
            world_size=self.world_size,
            every=self._local_every,
            keep_last=keep_last,
        )
        try:
            tier.create()
        except OSError as exc:
            self.local_tier_error = exc
            log.error(  # noqa: TRY400 - the message is the whole story
                "local checkpoint tier unusable on rank %d, durable tier only: %s", self.rank, exc
            )
            return None
        return tier

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
        durable: bool = False,
    ) -> Path | None:
        """Save `state` as the checkpoint of `step` where a tier is due; its final path, or None.

        Call it at every step boundary (or only when you want a checkpoint, with the default
        ``durable_every=1``): `step` is the index of the step just done, and a tier is due when
        ``step + 1`` is a multiple of its interval. The durable tier wins when both are due;
        ``durable=True`` writes the durable tier now whatever the interval (a requested
        checkpoint, the last step). None is returned when no tier is due or the save is refused.

        A checkpoint never holds non-finite state: when any rank's parameters, optimizer state or
        plain tensors in `state` hold a NaN or Inf, every rank refuses the save together, nothing is
        written, `refused_saves` and `last_refusal` say why, and None is returned, so the newest
        checkpoint stays one from before the fault (the check costs one device sync, here only).
        Synchronous by default. With ``async_save`` the state is copied here into host buffers kept
        from the previous save (`checkpoint_staging`) and written on a thread; a durable save
        still in flight is waited for first, a local one is not (the durable write queues behind
        it). A local save due while any rank still writes is skipped on every rank
        (`local_skipped`).
        `data_position`, `local` and `extras` must be JSON-able.
        """
        given = step
        try:  # numpy and 0-d integer tensors are fine; a bool or a float is a bug in the caller
            step = -1 if isinstance(step, bool) else operator.index(step)
        except TypeError:
            step = -1
        if not 0 <= step <= MAX_STEP:
            raise ValueError(f"step={given!r} must be an integer in [0, {MAX_STEP}]")
        inputs = SaveInputs(data_position, extras, local, metric)
        if not (durable or (step + 1) % self.durable_every == 0):
            if self._local_configured and (step + 1) % self._local_every == 0:
                return self._save_local(step, state, inputs)
            return None
        if self._writer.coordinated or not self.async_save:
            self._join()  # the check below is a collective on the group that write uses
        refusal = self._nonfinite_refusal(step, state)
        if refusal is not None:
            self.refused_saves += 1
            self.last_refusal = refusal
            log.error("checkpoint not saved: %s", refusal)
            return None
        final = self._durable.final(step)
        with checkpoint_phase(self.reporter):
            started = time.monotonic()
            job = capture(step, state, self.rank, inputs, started)
            if not self.async_save:
                self._write(job)
                return final
            slot = self._free_slot()
            job = replace(job, state=self._staging.stage(job.state, slot))
        # Behind a local write still in flight, if any: queued on the writer, not waited for here.
        self._writer.start(
            lambda: self._write(job), final, name=f"trainwarden-ckpt-{step}", slot=slot, coordinated=True
        )
        return final

    def _free_slot(self) -> int:
        """A staging slot no write in flight reads: the last one when idle, else the other one.

        At most one write is in flight when a save stages (a local save starts only when none
        is, a durable one queues only behind a local one), so two slots always leave one free.
        """
        last = self._writer.slot
        return (last + 1) % SLOTS if self._writer.busy else last

    def _save_local(self, step: int, state: Mapping[str, Any], inputs: SaveInputs) -> Path | None:
        """Save to the local tier, or skip it on every rank while a write is in flight on any.

        Blocking: one all-reduce of a flag (world size > 1), the finite check and the copy into
        host buffers; never the previous write (with ``local_when_busy="wait"``: that too, and
        no agreement is needed). Skipping together keeps the local steps of all
        ranks the same, so the newest one stays a common step to resume from. A rank that refuses
        (non-finite state) leaves the step missing on that rank alone, so it is never one.
        """
        if self.local_when_busy == "wait":
            waited = time.monotonic()
            self._join()
            self.local_wait_seconds += time.monotonic() - waited
        elif self._group.any_rank(self._writer.busy):
            self.local_skipped += 1
            if self.local_skipped == 1:
                log.warning(
                    "local checkpoint of step %d skipped: the previous write is still in flight "
                    "(local_every=%d is shorter than a write; manager.local_skipped counts these)",
                    step,
                    self._local_every,
                )
            return None
        if self._local is None:  # this rank's tier is unusable: it took part in the agreement only
            return None
        final = self._local.directory.final(step)
        with checkpoint_phase(self.reporter):
            bad = nonfinite_tensors(state)
            if bad:
                self.refused_saves += 1
                self.last_refusal = CheckpointError(
                    final,
                    "nonfinite",
                    f"rank {self.rank} holds non-finite values in {', '.join(bad[:5])}; not saved locally",
                )
                log.error("local checkpoint not saved: %s", self.last_refusal)
                return None
            job = capture(step, state, self.rank, inputs, time.monotonic())
            slot = self._free_slot()
            job = replace(job, state=self._staging.stage(job.state, slot))
        tier = self._local
        self._writer.start(
            lambda: self._finish(job, lambda: write_private(job, tier.directory, self.world_size)),
            final,
            name=f"trainwarden-local-ckpt-{step}",
            slot=slot,
            coordinated=False,
        )
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
        self._finish(job, lambda: write_coordinated(job, self._durable, self._group, self._on_written))

    def _finish(self, job: SaveJob, write: Callable[[], Path]) -> None:
        """Run one write; count a failure (and re-raise), report a success."""
        try:
            final = write()
        except BaseException as exc:
            self.failed_saves += 1
            self.last_error = exc
            raise
        seconds = time.monotonic() - job.started
        log.info("checkpoint step %d saved to %s in %.3f s", job.step, final, seconds)
        skipped = self.local_skipped if self._local is not None else None
        report_saved(self.reporter, job.step, final, seconds, skipped)

    # --- loading ------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories by name, newest first (complete or not; temp dirs excluded)."""
        return [path for _, path in self._durable.candidates()]

    def local_checkpoints(self) -> list[Path]:
        """The local-tier checkpoint directories of this rank, newest first (empty without a local tier)."""
        return [] if self._local is None else [path for _, path in self._local.directory.candidates()]

    def validate(self, path: Path) -> Manifest:
        """Check one checkpoint fully (manifest and every file); raise `CheckpointError`."""
        return self._durable.validate(path)

    def load_latest(self, state: Mapping[str, Any], *, restore_rng: bool = True) -> ResumePoint | None:
        """Load the newest valid checkpoint of either tier into `state` (in place); None when none.

        Invalid checkpoints are logged, counted in `rejected` and skipped. Every rank ends on the
        same checkpoint. RNG states are restored for this rank when the world size is unchanged.
        Everything is checked before anything is changed: the manifest and every file (rank 0 for
        the durable tier, each rank for its own local copy), then each rank's RNG state, decoded
        into scratch generators; only then does DCP load the tensors in place. A DCP failure (its
        `CheckpointException` is a `BaseException`, e.g. when the model's shapes changed) is a
        ``load_failed`` refusal and the previous one is tried. A local step is a candidate only
        when every rank holds a valid copy of it; at the same step the local copy is tried first.
        Afterwards no rank's local tier holds a step newer than the one resumed from.
        """
        self._join()
        group = self._group
        durable: list[tuple[int, Path]] = group.broadcast(
            self._durable.candidates() if self.rank == 0 else None
        )
        plan: list[tuple[int, bool, Path | None]] = [(step, False, path) for step, path in durable]
        local_valid: dict[int, tuple[Path, Manifest]] = {}
        if self._local_configured:  # every rank takes part, even one whose tier is unusable
            local_valid = {} if self._local is None else self._local.valid(self._reject)
            common = set.intersection(*(set(steps) for steps in group.gather_all(sorted(local_valid))))
            plan += [(step, True, None) for step in common]
        plan.sort(key=lambda entry: (-entry[0], not entry[1]))
        for step, is_local, durable_path in plan:
            if is_local:
                path, manifest = local_valid[step]
                resumed = self._load_local(state, path, manifest, restore_rng=restore_rng)
            else:
                assert durable_path is not None
                resumed = self._load_durable(state, durable_path, restore_rng=restore_rng)
            if resumed is not None:
                if self._local is not None:
                    self._local.discard_newer(resumed.step)
                return resumed
        if self._local is not None:
            self._local.discard_newer(-1)
        return None

    def _load_durable(self, state: Mapping[str, Any], path: Path, *, restore_rng: bool) -> ResumePoint | None:
        """Rank 0 validates `path`; every rank loads it; None (all ranks) when any rank could not."""
        problem: CheckpointError | None = None
        if self.rank == 0:
            try:
                self.validate(path)
            except CheckpointError as exc:
                problem = exc
        problem = self._group.broadcast(problem)
        if problem is not None:
            self._reject(problem)
            return None
        prepared: rng.PreparedRng | None = None
        try:
            manifest = read_manifest(path)
            prepared = prepared_rng(path, manifest, self.rank, self.world_size) if restore_rng else None
            error: CheckpointError | None = None
        except CheckpointError as exc:
            error = exc
        if self._agreed_failure(error) or self._agreed_failure(self._dcp_load(state, path)):
            return None
        if prepared is not None:
            prepared.apply()
        return resume_point(path, manifest, self.rank, self.world_size, "durable")

    def _load_local(
        self, state: Mapping[str, Any], path: Path, manifest: Manifest, *, restore_rng: bool
    ) -> ResumePoint | None:
        """Every rank loads its own validated local copy of one step; None (all ranks) on any failure."""
        prepared: rng.PreparedRng | None = None
        error: CheckpointError | None = None
        try:
            prepared = prepared_rng(path, manifest, self.rank, self.world_size) if restore_rng else None
        except CheckpointError as exc:
            error = exc
        if self._agreed_failure(error) or self._agreed_failure(self._dcp_load(state, path, private=True)):
            return None
        if prepared is not None:
            prepared.apply()
        return resume_point(path, manifest, self.rank, self.world_size, "local")

    def _dcp_load(
        self, state: Mapping[str, Any], path: Path, *, private: bool = False
    ) -> CheckpointError | None:
        """Load the tensors of `path` into `state` in place; the failure as a refusal, never raised.

        `private`: a local-tier copy this rank wrote alone, loaded without a process group.
        """
        from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load  # noqa: PLC0415

        try:
            with quiet_single_process():
                dcp_load(
                    dict(state),
                    checkpoint_id=path / STATE_DIR,
                    process_group=None if private else self._group.group,
                    no_dist=private or not self._group.distributed,
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

    def _reject(self, problem: CheckpointError) -> None:
        self.rejected[problem.reason] += 1
        log.warning("skipping checkpoint: %s", problem)
