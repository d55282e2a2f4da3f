"""One checkpoint directory: finding, validating, publishing and pruning the checkpoints in it.

Layout::

    step_0000000120/
        state/            torch.distributed.checkpoint output
        manifest.json     written last (see `trainwarden.client.manifest`)
    .tmp-step_0000000140/ a save in progress: never loaded, removed by the next publish

Publishing hashes every file of the temp directory, writes and fsyncs the manifest and the
directories, renames the temp directory into place and fsyncs the root, so a kill at any moment
leaves either the previous set of checkpoints or the new complete one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Literal

from trainwarden.client.manifest import (
    MANIFEST_NAME,
    CheckpointError,
    FileEntry,
    Manifest,
    read_manifest,
    sha256_file,
    verify_files,
)

STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step_(\d{10})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class CheckpointDirectory:
    """The checkpoints under one root, newest first; keep-last-N plus keep-best-N by metric."""

    def __init__(
        self, root: Path, *, keep_last: int, keep_best: int = 0, best_mode: Literal["min", "max"] = "min"
    ) -> None:
        self.root = root
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_mode = best_mode

    def final(self, step: int) -> Path:
        """Where the checkpoint of `step` lives once published."""
        return self.root / f"step_{step:010d}"

    def temp(self, step: int) -> Path:
        """Where the checkpoint of `step` is written before it is published."""
        return self.root / f"{_TMP_PREFIX}step_{step:010d}"

    def candidates(self) -> list[tuple[int, Path]]:
        """(step, directory) of every step directory, newest first (complete or not)."""
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

    def hash_files(self, tmp: Path) -> dict[str, FileEntry]:
        """Size and sha256 of every file under `tmp`, by relative path."""
        files: dict[str, FileEntry] = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[path.relative_to(tmp).as_posix()] = FileEntry(sha256_file(path), path.stat().st_size)
        return files

    def publish(self, tmp: Path, final: Path, manifest: Manifest) -> None:
        """Write the manifest into `tmp`, fsync everything, rename `tmp` to `final`, then prune."""
        manifest_path = tmp / MANIFEST_NAME
        with manifest_path.open("w", encoding="utf-8") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        directories = {Path(p).parent for p in manifest.files} | {Path()}
        for directory in sorted(directories, key=lambda p: -len(p.parts)):
            fsync_dir(tmp / directory)
        trash: Path | None = None
        if final.exists():  # re-saving a step (e.g. after falling back past a corrupt one)
            trash = self.root / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
            final.rename(trash)
        tmp.rename(final)
        fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune(keep_also=final)

    def prune(self, keep_also: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints and the `keep_best` best by metric."""
        complete: list[tuple[int, Path, float | None]] = []
        for step, path in self.candidates():
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
        for step, path in self.candidates():
            if path in keep:
                continue
            if step > newest_kept and not any(p == path for _, p, _ in complete):
                # A broken checkpoint newer than everything we keep: leave it for inspection.
                continue
            shutil.rmtree(path, ignore_errors=True)
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        """Remove temp and trash directories of interrupted saves."""
        for stale in self.root.iterdir():
            if stale.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Fsync a directory, so that a rename or a new entry in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
