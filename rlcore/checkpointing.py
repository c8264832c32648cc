"""Atomic, sentinel-marked checkpoints that a run resumes from exactly.

A checkpoint is one nested dict of `state_dict`s and python values (model, optimizers,
replay buffer, planner, counters, and `rlcore.seeding.rng_state()`), saved with
`torch.save` into its own folder. As in Dopamine's checkpointer
(`dopamine/discrete_domains/checkpointer.py`), a sentinel file marks a checkpoint as
complete, and only complete checkpoints are ever loaded. The folder is first written
under a temporary name and renamed into place, so a crash mid-write leaves at worst a
temporary folder that is ignored and cleaned up by the next save.

Directory layout (steps are env steps, zero-padded to 12 digits so names sort)::

    run_dir/checkpoints/
        step_000000050000/
            state.pt      # torch.save of the whole state dict
            COMPLETE      # JSON: {"step", "time", "size", "sha256", "file", "format"}
        step_000000100000/
            state.pt
            COMPLETE
        .tmp_step_000000150000_4242/   # a save in progress (or interrupted): never loaded

Only the newest `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from rlcore.types import Stateful

__all__ = ["CheckpointError", "Checkpointer", "Stateful"]

_log = logging.getLogger("rlcore")

STATE_FILE = "state.pt"
SENTINEL = "COMPLETE"
_FORMAT = 1
_STEP_DIGITS = 12
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.(?:tmp|old)_step_(\d+)_(\d+)$")
_HASH_CHUNK = 1 << 24  # 16 MiB


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message names the problem and the fix."""


class _HashingWriter:
    """File wrapper that hashes and counts the bytes `torch.save` writes (one pass)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def fsync_path(path: Path) -> None:
    """Persist a file or a directory's entries (renames) where the OS supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _find_numpy(value: Any, path: str = "state") -> str | None:
    """The key path of the first numpy object in `value`, or None.

    numpy objects make `torch.load(weights_only=True)` refuse the whole file, so `save`
    rejects them up front instead of at resume time.
    """
    if isinstance(value, (np.ndarray, np.generic)):
        return path
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_numpy(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_numpy(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers come from an earlier, failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but not ours to signal
    return True


class Checkpointer:
    """Writes `directory/step_<n>/` checkpoints atomically and resumes from the newest.

    Save order: temporary folder -> `state.pt` (fsynced) -> `COMPLETE` sentinel with the
    file's size and sha256 (fsynced) -> rename to `step_<n>` -> prune. A folder without
    the sentinel, or a temporary folder, is never loaded.

    Args:
        directory: folder holding the `step_<n>` checkpoints (created by the first save).
        keep: number of newest complete checkpoints to keep (at least 1).
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (got {keep}): the number of checkpoints kept")
        self.directory = Path(directory)
        self.keep = keep

    # ------------------------------------------------------------------
    # Naming and discovery.
    # ------------------------------------------------------------------
    def path_for(self, step: int) -> Path:
        """The folder a checkpoint at env step `step` lives in."""
        return self.directory / f"step_{step:0{_STEP_DIGITS}d}"

    def _step_dirs(self) -> list[tuple[int, Path]]:
        found = []
        if not self.directory.is_dir():
            return found
        for entry in self.directory.iterdir():
            match = _STEP_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def _complete(self) -> list[tuple[int, Path]]:
        return [(step, path) for step, path in self._step_dirs() if (path / SENTINEL).is_file()]

    def steps(self) -> list[int]:
        """Env steps of the complete checkpoints, oldest first."""
        return [step for step, _ in self._complete()]

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None when there is none."""
        complete = self._complete()
        return complete[-1][1] if complete else None

    # ------------------------------------------------------------------
    # Saving.
    # ------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Atomically write `state` as the checkpoint for env step `step`; return its folder.

        Saving a step that already exists replaces it (old folder renamed aside, new one
        renamed in, old one deleted). Afterwards only the newest `keep` complete checkpoints
        remain, and stale temporary folders are removed.
        """
        if step < 0:
            raise CheckpointError(f"checkpoint step must be >= 0 (got {step})")
        numpy_path = _find_numpy(state)
        if numpy_path is not None:
            raise CheckpointError(
                f"{numpy_path} is a numpy object, which torch.load(weights_only=True) refuses; "
                "store it as a tensor (torch.from_numpy) or a python list/number instead"
            )

        final = self.path_for(step)
        tmp = self.directory / f".tmp_{final.name}_{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()

        # State file, hashed while it is written.
        try:
            with open(tmp / STATE_FILE, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(state, writer)
                f.flush()
                os.fsync(f.fileno())

            # Sentinel: its presence means state.pt is whole; its content lets load check it.
            sentinel = {
                "step": int(step),
                "time": time.time(),
                "file": STATE_FILE,
                "size": writer.size,
                "sha256": writer.sha256.hexdigest(),
                "format": _FORMAT,
            }
            with open(tmp / SENTINEL, "w") as f:
                json.dump(sentinel, f)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        # Rename into place (replacing an existing folder of the same step safely).
        if final.exists():
            old = self.directory / f".old_{final.name}_{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_path(self.directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_path(self.directory)

        self._prune()
        return final

    def _prune(self) -> None:
        """Delete complete checkpoints beyond `keep` and temporary folders of dead saves."""
        complete = self._complete()
        for _, path in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)
        for entry in self.directory.iterdir():
            match = _TMP_RE.match(entry.name)
            if match and entry.is_dir() and not _pid_alive(int(match.group(2))):
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------
    # Loading.
    # ------------------------------------------------------------------
    def _resolve(self, path: str | os.PathLike[str] | None) -> Path:
        if path is None:
            latest = self.latest()
            if latest is None:
                raise CheckpointError(
                    f"no complete checkpoint in {self.directory} (a folder counts only with its "
                    f"{SENTINEL} file); start without resuming, or point to another --run_dir"
                )
            return latest
        path = Path(path)
        if path.is_file() and path.name in (STATE_FILE, SENTINEL):
            path = path.parent
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist; pass a step_<n> folder")
        if not (path / SENTINEL).is_file():
            raise CheckpointError(
                f"the checkpoint at {path} is incomplete (no {SENTINEL} sentinel: its save was "
                "interrupted); delete it and resume from an earlier one"
            )
        return path

    def verify(self, path: str | os.PathLike[str] | None = None, *, checksum: bool = True) -> Path:
        """Check a checkpoint's state file against its sentinel; return the folder.

        Raises:
            CheckpointError: the folder is incomplete, or `state.pt` is missing, truncated
                or corrupt.
        """
        folder = self._resolve(path)
        fix = "delete it to resume from the previous one, or start a fresh --run_dir"
        try:
            sentinel = json.loads((folder / SENTINEL).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"the checkpoint at {folder} has an unreadable {SENTINEL} sentinel ({error}); {fix}"
            ) from error
        state_file = folder / sentinel.get("file", STATE_FILE)
        if not state_file.is_file():
            raise CheckpointError(f"the checkpoint at {folder} has no {state_file.name}; {fix}")
        size = state_file.stat().st_size
        if "size" in sentinel and size != sentinel["size"]:
            raise CheckpointError(
                f"the checkpoint at {folder} is corrupt (size mismatch: {state_file} has "
                f"{size} bytes, the sentinel records {sentinel['size']}); {fix}"
            )
        if checksum and "sha256" in sentinel and _sha256_file(state_file) != sentinel["sha256"]:
            raise CheckpointError(
                f"the checkpoint at {folder} is corrupt (checksum mismatch in {state_file}); {fix}"
            )
        return folder

    def load(
        self,
        path: str | os.PathLike[str] | None = None,
        map_location: str | torch.device | None = "cpu",
        *,
        checksum: bool = True,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Load the newest complete checkpoint (or the folder `path`) after verifying it.

        Args:
            path: a `step_<n>` folder (or its `state.pt`); None picks `latest()`.
            map_location: passed to `torch.load`.
            checksum: also verify the sha256 (reads the file twice); the size is always checked.
            weights_only: use torch's restricted unpickler; checkpoints of state_dicts,
                tensors and python builtins (and `rng_state()`) load with it.
        """
        folder = self.verify(path, checksum=checksum)
        state_file = folder / STATE_FILE
        try:
            return torch.load(state_file, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as error:
            if weights_only and "weights only" in str(error).lower():
                raise CheckpointError(
                    f"{state_file} holds objects that torch.load(weights_only=True) refuses; "
                    "save state_dicts, tensors and python builtins only, or, if you trust the "
                    "file, call load(..., weights_only=False)"
                ) from error
            raise CheckpointError(
                f"the checkpoint at {folder} is corrupt ({state_file} cannot be unpickled: "
                f"{error}); delete it to resume from the previous one, or start a fresh --run_dir"
            ) from error
        except (RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(
                f"the checkpoint at {folder} is corrupt ({state_file} cannot be read: {error}); "
                "delete it to resume from the previous one, or start a fresh --run_dir"
            ) from error
