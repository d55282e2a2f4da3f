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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import re
import shutil
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from trainwarden.client import rng
from trainwarden.client.finite import nonfinite_tensors
from trainwarden.client.manifest import (
    MANIFEST_NAME,
    MAX_STEP,
    CheckpointError,
    FileEntry,
    Manifest,
    RankState,
    read_manifest,
    sha256_file,
    verify_files,
)

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointError", "CheckpointManager", "ModelOptimizerState", "ResumePoint"]

log = logging.getLogger(__name__)

STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step_(\d{10})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


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


class ModelOptimizerState:
    """Stateful wrapper that saves a model and its optimizers through DCP's state-dict helpers.

    ``get_state_dict``/``set_state_dict`` handle DDP/FSDP prefixes and sharded tensors, and
    initialise empty optimizer state so a fresh optimizer can be loaded into.
    """

    def __init__(self, model: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state (sharded where the model is)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415

        model_sd, optim_sd = get_state_dict(self.model, list(self.optimizers))
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict` produced."""
        from torch.distributed.checkpoint.state_dict import set_state_dict  # noqa: PLC0415

        set_state_dict(
            self.model,
            list(self.optimizers),
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


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
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._pending: Path | None = None
        self._dist, self._pg, self.rank, self.world_size = _setup_distributed()
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
        final = self.root / f"step_{step:010d}"
        with self._phase():
            started = time.monotonic()
            resolved = _resolve(state)
            rank_state = {
                "rank": self.rank,
                "rng": rng.capture(),
                "data_position": _json_copy(data_position, "data_position"),
                "local": _json_copy(dict(local or {}), "local"),
            }
            job_extras = _json_copy(dict(extras or {}), "extras")
            metric_value = None if metric is None or not math.isfinite(float(metric)) else float(metric)
            job = _SaveJob(step, resolved, rank_state, job_extras, metric_value, started)
            if not self.async_save:
                self._write(job)
                return final
            job = replace(job, state=_to_cpu(resolved))
        self._pending = final
        self._thread = threading.Thread(
            target=self._write_in_background, args=(job,), name=f"trainwarden-ckpt-{step}"
        )
        self._thread.start()
        return final

    def _nonfinite_refusal(self, step: int, state: Mapping[str, Any]) -> CheckpointError | None:
        """A refusal when any rank's state holds NaN/Inf (all ranks agree), else None."""
        bad = nonfinite_tensors(state)
        ranks_bad = [(r, names) for r, names in enumerate(self._gather_all(bad)) if names]
        if not ranks_bad:
            return None
        rank, names = ranks_bad[0]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        detail = (
            f"rank {rank} holds non-finite values in {shown}; the newest checkpoint stays the last finite one"
        )
        return CheckpointError(self.root / f"step_{step:010d}", "nonfinite", detail)

    def wait(self) -> Path | None:
        """Wait for an asynchronous save; return its path, or raise `CheckpointError` if it failed."""
        pending = self._pending
        self._join()
        error, self._thread_error = self._thread_error, None
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
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._pending = None

    def _write_in_background(self, job: _SaveJob) -> None:
        try:
            self._write(job)
        except BaseException as exc:
            self._thread_error = exc
            log.exception("asynchronous checkpoint save failed")

    def _write(self, job: _SaveJob) -> None:
        import torch  # noqa: PLC0415
        from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: PLC0415
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # noqa: PLC0415

        step = job.step
        name = f"step_{step:010d}"
        tmp = self.root / f"{_TMP_PREFIX}{name}"
        final = self.root / name
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self._barrier()
            writer = FileSystemWriter(tmp / STATE_DIR, sync_files=True)
            with _quiet_single_process():
                dcp_save(job.state, storage_writer=writer, process_group=self._pg, no_dist=not self._dist)
            if self._on_written is not None:
                self._on_written(tmp)
            ranks = self._gather(job.rank_state)
            if self.rank == 0:
                self._publish(job, tmp, final, ranks, torch.__version__)
            self._barrier()
        except BaseException as exc:
            self.failed_saves += 1
            self.last_error = exc
            raise
        seconds = time.monotonic() - job.started
        log.info("checkpoint step %d saved to %s in %.3f s", step, final, seconds)
        if self.reporter is not None:
            try:
                self.reporter.checkpoint_saved(step, str(final), seconds=seconds)
            except Exception:
                log.exception("reporter.checkpoint_saved failed (ignored)")

    def _publish(
        self, job: _SaveJob, tmp: Path, final: Path, ranks: list[dict[str, Any]], torch_version: str
    ) -> None:
        """Rank 0: hash every file, write the manifest, rename into place, prune."""
        files: dict[str, FileEntry] = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = FileEntry(sha256_file(path), path.stat().st_size)
        manifest = Manifest(
            step=job.step,
            world_size=self.world_size,
            files=files,
            ranks=tuple(
                RankState(r["rank"], r["rng"], r["data_position"], r["local"])
                for r in sorted(ranks, key=lambda r: int(r["rank"]))
            ),
            extras=job.extras,
            metric=job.metric,
            created_at=time.time(),
            torch_version=torch_version,
        )
        manifest_path = tmp / MANIFEST_NAME
        with manifest_path.open("w", encoding="utf-8") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        for directory in sorted({Path(p).parent for p in files} | {Path()}, key=lambda p: -len(p.parts)):
            _fsync_dir(tmp / directory)
        trash: Path | None = None
        if final.exists():  # re-saving a step (e.g. after falling back past a corrupt one)
            trash = self.root / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
            final.rename(trash)
        tmp.rename(final)
        _fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self._prune(keep_also=final)

    def _prune(self, keep_also: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints and the `keep_best` best by metric."""
        complete: list[tuple[int, Path, float | None]] = []
        for step, path in self._candidates():
            try:
                manifest = read_manifest(path)
            except CheckpointError:
                continue  # unreadable ones are dropped below unless they are the newest
            complete.append((step, path, manifest.metric))
        keep = {keep_also}
        keep.update(path for _, path, _ in complete[: self.keep_last])
        if self.keep_best:
            scored = [(m, step, path) for step, path, m in complete if m is not None]
            scored.sort(key=lambda t: (t[0] if self.best_mode == "min" else -t[0], -t[1]))
            keep.update(path for _, _, path in scored[: self.keep_best])
        newest_kept = max((s for s, p, _ in complete if p in keep), default=-1)
        for step, path in self._candidates():
            if path in keep:
                continue
            if step > newest_kept and not any(p == path for _, p, _ in complete):
                # A broken checkpoint newer than everything we keep: leave it for inspection.
                continue
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.iterdir():
            if stale.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    # --- loading ------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories by name, newest first (complete or not; temp dirs excluded)."""
        return [path for _, path in self._candidates()]

    def _candidates(self) -> list[tuple[int, Path]]:
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found, reverse=True)

    def validate(self, path: Path) -> Manifest:
        """Check one checkpoint fully (manifest and every file); raise `CheckpointError`."""
        manifest = read_manifest(path)
        match = _STEP_DIR.match(path.name)
        if match is not None and manifest.step != int(match.group(1)):
            raise CheckpointError(
                path / MANIFEST_NAME, "foreign", f"manifest step {manifest.step} != directory"
            )
        verify_files(path, manifest)
        return manifest

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
        for _, path in self._broadcast(self._candidates() if self.rank == 0 else None):
            problem: CheckpointError | None = None
            if self.rank == 0:
                try:
                    self.validate(path)
                except CheckpointError as exc:
                    problem = exc
            problem = self._broadcast(problem)
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
            with _quiet_single_process():
                dcp_load(
                    dict(state),
                    checkpoint_id=path / STATE_DIR,
                    process_group=self._pg,
                    no_dist=not self._dist,
                )
        except CheckpointError as exc:
            return exc
        except (Exception, CheckpointException) as exc:
            return CheckpointError(path / STATE_DIR, "load_failed", f"cannot load state: {exc!r}"[:2000])
        return None

    def _agreed_failure(self, error: CheckpointError | None) -> bool:
        """True (and the first error counted) when any rank failed: all ranks then move on together."""
        errors = [e for e in self._gather_all(error) if e is not None]
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

    def _barrier(self) -> None:
        if self._dist:
            import torch.distributed as dist  # noqa: PLC0415

            dist.barrier(group=self._pg)

    def _gather(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        if not self._dist:
            return [obj]
        import torch.distributed as dist  # noqa: PLC0415

        out: list[Any] = [None] * self.world_size if self.rank == 0 else []
        dist.gather_object(obj, out if self.rank == 0 else None, dst=0, group=self._pg)
        return out

    def _gather_all(self, obj: Any) -> list[Any]:
        if not self._dist:
            return [obj]
        import torch.distributed as dist  # noqa: PLC0415

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if not self._dist:
            return obj
        import torch.distributed as dist  # noqa: PLC0415

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]


@dataclass(frozen=True, slots=True)
class _SaveJob:
    """One save, captured at the step boundary (for async saves, `state` is a CPU copy)."""

    step: int
    state: dict[str, Any]
    rank_state: dict[str, Any]
    extras: dict[str, Any]
    metric: float | None
    started: float


def _setup_distributed() -> tuple[bool, Any, int, int]:
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        return False, None, 0, 1
    # A gloo group of our own: checkpoint traffic (possibly from the async thread) never interleaves
    # with the training's collectives, and works whatever the training backend is.
    group = dist.new_group(backend="gloo")
    return True, group, dist.get_rank(), dist.get_world_size()


def _resolve(state: Mapping[str, Any]) -> dict[str, Any]:
    """Replace stateful objects by their state dicts (DCP would do this too; we need it to snapshot)."""
    return {
        key: value.state_dict()
        if hasattr(value, "state_dict") and hasattr(value, "load_state_dict")
        else value
        for key, value in state.items()
    }


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU, so training can go on mutating the originals."""
    import torch  # noqa: PLC0415

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _json_copy(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {what} must be JSON-able: {exc}") from exc


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes a single process" when there is no process group: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
