"""HDF5 episode datasets: the offline data format, a writer, and a streaming reader.

Online runs export their replay buffer to this format (`export_replay`,
`python -m runners.export`), and the offline runner (`runners.offline`) and any
`EpisodeSliceBuffer` (`load_into`) read it back. Files are read and written with h5py.

Format (`format = "tdmpc2-gin/episodes"`, `format_version = 1`)
----------------------------------------------------------------
One HDF5 file holds whole episodes of one task, concatenated row by row in the root
group ``/``. Rows follow the replay buffer's *arrival* convention (`rlcore.types`): row t
of an episode holds `obs_t` with the action and reward that led to it, so each episode's
first row holds its first observation with a NaN action and a NaN reward (never read).
N is the number of rows (observations), M the number of episodes, A the action dimension.

Datasets (all required; row datasets are chunked along the first axis, resizable, with a
fletcher32 checksum per chunk, and optionally gzip-compressed):

    ==================  ============  ================  ===================================
    name                shape         dtype             meaning
    ==================  ============  ================  ===================================
    /obs                [N, *obs]     float32 (uint8    observation of each row
                                      for pixels)
    /action             [N, A]        float32           action that led to the row; NaN in
                                                        each episode's first row
    /reward             [N]           float32           reward of that action (summed over
                                                        the action repeat); NaN in first rows
    /terminated         [N]           bool              the row's obs is terminal (no
                                                        bootstrapping); time limits are not
    /episode            [N]           int64             episode id, constant within episode
    /episode_starts     [M]           int64             first row of each episode;
                                                        starts[0] = 0, starts[i+1] =
                                                        starts[i] + lengths[i]
    /episode_lengths    [M]           int64             rows of each episode (transitions+1)
    ==================  ============  ================  ===================================

Root attributes (all required unless marked optional):

    ===================  =======  =========================================================
    name                 type     meaning
    ===================  =======  =========================================================
    format               str      "tdmpc2-gin/episodes"
    format_version       int      1; readers refuse newer versions
    framework            str      "tdmpc2-gin"
    framework_version    str      version of the writing framework (git commit appended
                                  as "+g<sha>" when known)
    created_at           str      ISO-8601 UTC time of writing
    task                 str      task name (TD-MPC2 naming, e.g. "cartpole-balance"); ""
                                  when unknown
    obs_shape            int64[]  shape of one observation
    obs_dtype            str      "float32" or "uint8"
    obs_type             str      "state" or "pixels"
    action_dim           int      A; actions live in [-1, 1]
    action_repeat        int      env steps per agent step (per row)
    episode_length       int      maximum episode length in agent steps (the time limit)
    episodic             bool     episodes can end by termination
    num_episodes         int      M
    num_rows             int      N
    num_transitions      int      N - M
    env_steps            int      num_transitions * action_repeat
    meta                 str      (optional) JSON object: provenance such as the source run
                                  directory, checkpoint and its env step
    ===================  =======  =========================================================

Reading never holds a whole file in memory: `HDF5EpisodeDataset.iter_episodes` reads
blocks of at most `chunk_episodes` consecutive episodes, and `load_into` adds them to a
replay buffer block by block. Writing is atomic: a temporary file in the same folder is
renamed into place once complete, and an existing file is never replaced unless asked.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import importlib.metadata
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tensordict import TensorDict

from rlcore.checkpointing import fsync_path
from rlcore.types import ACTION, EPISODE, OBS, REWARD, TERMINATED, EnvSpec

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "FORMAT",
    "FORMAT_VERSION",
    "HDF5EpisodeDataset",
    "export_replay",
    "load_into",
    "write_episodes",
]

_log = logging.getLogger("components")

FORMAT = "tdmpc2-gin/episodes"
FORMAT_VERSION = 1
FRAMEWORK = "tdmpc2-gin"
STARTS = "episode_starts"
LENGTHS = "episode_lengths"
ROW_KEYS = (OBS, ACTION, REWARD, TERMINATED, EPISODE)
REQUIRED_DATASETS = (*ROW_KEYS, STARTS, LENGTHS)
REQUIRED_ATTRS = (
    "format", "format_version", "framework", "framework_version", "created_at", "task",
    "obs_shape", "obs_dtype", "obs_type", "action_dim", "action_repeat", "episode_length",
    "episodic", "num_episodes", "num_rows", "num_transitions", "env_steps",
)
_CHUNK_BYTES = 1 << 18  # ~256 KiB per HDF5 chunk
_FLUSH_BYTES = 16 << 20  # rows gathered in memory before a write while exporting
_REPO_ROOT = Path(__file__).resolve().parents[2]

_FIX_REWRITE = ("re-create it (`python -m runners.export --run_dir=RUN --out=FILE.h5`, or "
                "components.replay.hdf5.write_episodes) or copy it again")


class DatasetError(ValueError):
    """An HDF5 episode dataset that cannot be read or written; the message names the file
    and the fix."""


def _framework_version() -> str:
    """The package version (installed metadata, else pyproject.toml), plus the git commit."""
    try:
        version = importlib.metadata.version(FRAMEWORK)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
        pyproject = _REPO_ROOT / "pyproject.toml"
        if pyproject.is_file():
            match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
            if match:
                version = match.group(1)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def _obs_dtype(spec: EnvSpec) -> np.dtype:
    return np.dtype(np.uint8) if spec.obs_type == "pixels" else np.dtype(np.float32)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's attributes say about it (see the module docstring)."""

    path: str
    format_version: int
    framework_version: str
    created_at: str
    task: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    obs_type: str
    action_dim: int
    action_repeat: int
    episode_length: int
    episodic: bool
    num_episodes: int
    num_rows: int
    num_transitions: int
    env_steps: int
    meta: dict[str, Any] = field(default_factory=dict)

    def spec(self, num_envs: int = 1) -> EnvSpec:
        """The EnvSpec of the env that produced the data (with `num_envs` envs)."""
        return EnvSpec(obs_shape=self.obs_shape, action_dim=self.action_dim,
                       episode_length=self.episode_length, action_repeat=self.action_repeat,
                       num_envs=num_envs, task=self.task, episodic=self.episodic,
                       obs_type=self.obs_type)


# ---------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------
class _RowWriter:
    """Appends episodes to resizable row datasets, a few MiB at a time."""

    def __init__(self, file: h5py.File, spec: EnvSpec, *, compression: str | None,
                 compression_opts: Any, checksum: bool) -> None:
        self.file, self.spec = file, spec
        self.obs_shape = tuple(int(d) for d in spec.obs_shape)
        self.action_dim = int(spec.action_dim)
        self.dtypes = {OBS: _obs_dtype(spec), ACTION: np.dtype(np.float32),
                       REWARD: np.dtype(np.float32), TERMINATED: np.dtype(bool),
                       EPISODE: np.dtype(np.int64)}
        self.shapes = {OBS: self.obs_shape, ACTION: (self.action_dim,), REWARD: (),
                       TERMINATED: (), EPISODE: ()}
        row_bytes = sum(self.dtypes[k].itemsize * int(np.prod(self.shapes[k], dtype=np.int64))
                        for k in ROW_KEYS)
        chunk_rows = max(1, min(1 << 16, _CHUNK_BYTES // row_bytes))
        self.flush_rows = max(chunk_rows, _FLUSH_BYTES // row_bytes)
        self.datasets = {
            k: file.create_dataset(k, shape=(0, *self.shapes[k]), maxshape=(None, *self.shapes[k]),
                                   dtype=self.dtypes[k], chunks=(chunk_rows, *self.shapes[k]),
                                   compression=compression, compression_opts=compression_opts,
                                   fletcher32=checksum)
            for k in ROW_KEYS
        }
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.num_rows = 0
        self.lengths: list[int] = []

    def append(self, episode: TensorDict) -> None:
        rows = self._validate(episode)
        self.pending.append(rows)
        self.pending_rows += rows[OBS].shape[0]
        self.lengths.append(rows[OBS].shape[0])
        if self.pending_rows >= self.flush_rows:
            self.flush()

    def _validate(self, episode: TensorDict) -> dict[str, np.ndarray]:
        index = len(self.lengths)
        if not isinstance(episode, TensorDict) or episode.batch_dims != 1:
            raise DatasetError(f"episode {index} must be a TensorDict with batch_size [n+1], got "
                               f"{type(episode).__name__} {getattr(episode, 'batch_size', '')}")
        missing = [k for k in ROW_KEYS if k not in episode.keys()]
        if missing:
            raise DatasetError(f"episode {index} is missing keys {missing}; episodes need "
                               f"{list(ROW_KEYS)} (see rlcore.types)")
        n = int(episode.batch_size[0])
        if n < 1:
            raise DatasetError(f"episode {index} has no rows")
        rows = {}
        for key in ROW_KEYS:
            value = episode.get(key).detach().cpu()
            if len(self.shapes[key]) == 0 and value.ndim == 2 and value.shape[-1] == 1:
                value = value.squeeze(-1)  # [n, 1] -> [n]
            if tuple(value.shape) != (n, *self.shapes[key]):
                raise DatasetError(
                    f"episode {index}: {key!r} has shape {tuple(value.shape)}, expected "
                    f"{(n, *self.shapes[key])} for obs {self.obs_shape} and {self.action_dim} "
                    "action dims (the EnvSpec passed to the writer)")
            rows[key] = value.numpy().astype(self.dtypes[key], copy=False)
        if not (rows[EPISODE] == rows[EPISODE][0]).all():
            raise DatasetError(f"episode {index}: {EPISODE!r} must be constant within an episode")
        return rows

    def flush(self) -> None:
        if not self.pending:
            return
        n = self.pending_rows
        for key, dset in self.datasets.items():
            block = np.concatenate([rows[key] for rows in self.pending])  # [n, ...]
            dset.resize(self.num_rows + n, axis=0)
            dset[self.num_rows:self.num_rows + n] = block
        self.num_rows += n
        self.pending, self.pending_rows = [], 0

    def finish(self, meta: dict[str, Any]) -> DatasetInfo:
        self.flush()
        lengths = np.asarray(self.lengths, dtype=np.int64)  # [M]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # [M]
        self.file.create_dataset(STARTS, data=starts)
        self.file.create_dataset(LENGTHS, data=lengths)
        spec = self.spec
        num_episodes, num_rows = int(lengths.size), int(self.num_rows)
        num_transitions = num_rows - num_episodes
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "framework": FRAMEWORK,
            "framework_version": _framework_version(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "task": spec.task or "",
            "obs_shape": np.asarray(self.obs_shape, dtype=np.int64),
            "obs_dtype": self.dtypes[OBS].name,
            "obs_type": spec.obs_type,
            "action_dim": self.action_dim,
            "action_repeat": int(spec.action_repeat),
            "episode_length": int(spec.episode_length),
            "episodic": bool(spec.episodic),
            "num_episodes": num_episodes,
            "num_rows": num_rows,
            "num_transitions": num_transitions,
            "env_steps": num_transitions * int(spec.action_repeat),
            "meta": json.dumps(meta, default=str, sort_keys=True),
        }
        for name, value in attrs.items():
            self.file.attrs[name] = value
        return _info_from_attrs("", self.file.attrs)


def write_episodes(path: str | os.PathLike[str], episodes: Iterable[TensorDict], spec: EnvSpec,
                   *, meta: dict[str, Any] | None = None, overwrite: bool = False,
                   compression: str | None = None, compression_opts: Any = None,
                   checksum: bool = True) -> DatasetInfo:
    """Write whole episodes to an HDF5 dataset at `path`, atomically.

    Episodes stream through: at most ~16 MiB of rows are held before each write. The file
    is written under a temporary name in the same folder and renamed into place when
    complete, so readers never see a partial file.

    Args:
        episodes: TensorDict[n+1] episodes in the arrival convention (first row: NaN action
            and reward), with the keys of `EpisodeSliceBuffer.add`.
        spec: the env's spec (obs shape and type, action dim, task, action repeat, ...).
        meta: JSON-serializable provenance stored in the `meta` attribute.
        overwrite: replace an existing file (otherwise an existing file is an error).
        compression: an h5py filter for the row datasets (`"gzip"`, or None).
        checksum: add fletcher32 checksums per chunk, so corrupt data is detected on read.

    Raises:
        DatasetError: `path` exists (without `overwrite`), its folder is missing, there are
            no episodes, or an episode does not fit `spec`. Nothing is left at `path`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise DatasetError(f"{path} already exists; refusing to overwrite it. Choose another "
                           "output path, or pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise DatasetError(f"cannot write {path}: folder {path.parent} does not exist; create "
                           "it first")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            writer = _RowWriter(f, spec, compression=compression,
                                compression_opts=compression_opts, checksum=checksum)
            for episode in episodes:
                writer.append(episode)
            if not writer.lengths:
                raise DatasetError(f"no episodes to write to {path}; a dataset needs at least "
                                   "one complete episode")
            info = writer.finish(dict(meta or {}))
        fsync_path(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return dataclasses.replace(info, path=str(path))


def _rename_no_clobber(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` unless `path` appeared meanwhile (hard link, then unlink)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise DatasetError(f"{path} appeared while it was being written; refusing to "
                           "overwrite it. Choose another output path") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
            raise
        os.replace(tmp, path)  # filesystems without hard links
        return
    tmp.unlink()


def export_replay(replay: Any, spec: EnvSpec, path: str | os.PathLike[str], *,
                  overwrite: bool = False, compression: str | None = None,
                  **meta: Any) -> DatasetInfo:
    """Write every stored episode of a replay buffer (oldest first) to an HDF5 dataset.

    `replay` needs an `episodes()` iterator (as `EpisodeSliceBuffer` has); episodes stream
    to the file one block at a time. Keyword arguments beyond the named ones are stored in
    the `meta` attribute (e.g. `source=run_dir, source_env_step=...`).
    """
    if not hasattr(replay, "episodes"):
        raise DatasetError(f"{type(replay).__name__} cannot be exported: it has no episodes() "
                           "iterator (EpisodeSliceBuffer has one)")
    return write_episodes(path, replay.episodes(), spec, meta=meta, overwrite=overwrite,
                          compression=compression)


# ---------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_from_attrs(path: str, attrs: Any) -> DatasetInfo:
    meta_text = _text(attrs.get("meta", "{}")) or "{}"
    try:
        meta = json.loads(meta_text)
    except ValueError:
        meta = {"raw": meta_text}
    return DatasetInfo(
        path=path,
        format_version=int(attrs["format_version"]),
        framework_version=_text(attrs["framework_version"]),
        created_at=_text(attrs["created_at"]),
        task=_text(attrs["task"]),
        obs_shape=tuple(int(d) for d in np.atleast_1d(attrs["obs_shape"])),
        obs_dtype=_text(attrs["obs_dtype"]),
        obs_type=_text(attrs["obs_type"]),
        action_dim=int(attrs["action_dim"]),
        action_repeat=int(attrs["action_repeat"]),
        episode_length=int(attrs["episode_length"]),
        episodic=bool(attrs["episodic"]),
        num_episodes=int(attrs["num_episodes"]),
        num_rows=int(attrs["num_rows"]),
        num_transitions=int(attrs["num_transitions"]),
        env_steps=int(attrs["env_steps"]),
        meta=meta if isinstance(meta, dict) else {"meta": meta},
    )


class HDF5EpisodeDataset:
    """A read-only HDF5 episode dataset (format in the module docstring), read in blocks.

    Opening checks the whole schema (format, required datasets and attributes, dtypes,
    shapes, episode boundaries) and raises one `DatasetError` naming the file and the fix;
    the data itself is read lazily by `iter_episodes`, whose blocks hold at most
    `chunk_episodes` consecutive episodes, so a dataset larger than memory can be
    streamed into a replay buffer. Only the boundary arrays ([M] int64) stay in memory.

    Not a registered replay buffer (it cannot `add` or `sample`): load it into one with
    `load_into`.

    Attributes:
        info: the file's attributes as a `DatasetInfo`.
        max_rows_read: the largest number of rows read at once so far (memory diagnostics).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.max_rows_read = 0
        self.num_reads = 0
        if not self.path.exists():
            raise DatasetError(f"dataset {self.path} does not exist; pass the path of an HDF5 "
                               "episode dataset (.h5), e.g. one written by `python -m "
                               "runners.export`")
        if not self.path.is_file():
            raise DatasetError(f"dataset {self.path} is not a file; pass the path of an HDF5 "
                               "episode dataset (.h5)")
        with self._open() as f:
            self.info = self._check_schema(f)
            try:
                self.episode_lengths = np.asarray(f[LENGTHS][...], dtype=np.int64)  # [M]
                self.episode_starts = np.asarray(f[STARTS][...], dtype=np.int64)  # [M]
            except OSError as error:
                raise self._corrupt(f"reading the episode boundaries failed ({error})") from None
        self._check_boundaries()

    # ------------------------------------------------------------------ schema
    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as error:
            reason = str(error).split("(", 1)[-1].rstrip(")") if "(" in str(error) else str(error)
            raise DatasetError(
                f"dataset {self.path} cannot be opened as HDF5 ({reason}): the file is "
                f"truncated, corrupt or not HDF5; {_FIX_REWRITE}") from None

    def _corrupt(self, what: str) -> DatasetError:
        return DatasetError(f"dataset {self.path} is corrupt: {what}; {_FIX_REWRITE}")

    def _check_schema(self, f: h5py.File) -> DatasetInfo:
        name = str(self.path)
        fmt = _text(f.attrs.get("format", ""))
        if fmt != FORMAT:
            shown = f"format {fmt!r}" if fmt else "no 'format' attribute"
            raise DatasetError(
                f"dataset {name} is not a {FORMAT!r} episode dataset ({shown}); the layout is "
                "documented in components/replay/hdf5.py. Convert it with "
                "components.replay.hdf5.write_episodes")
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION or version < 1:
            raise DatasetError(
                f"dataset {name} has format_version {version}, this framework reads "
                f"1..{FORMAT_VERSION}; update the framework (written by "
                f"{_text(f.attrs.get('framework_version', '?'))}) or re-export the data")
        missing = [d for d in REQUIRED_DATASETS if not isinstance(f.get(d), h5py.Dataset)]
        if missing:
            raise DatasetError(
                f"dataset {name} is missing required dataset(s) {', '.join(missing)}; an "
                f"episode dataset needs {', '.join(REQUIRED_DATASETS)} (see "
                f"components/replay/hdf5.py); {_FIX_REWRITE}")
        missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
        if missing:
            raise DatasetError(
                f"dataset {name} is missing required attribute(s) {', '.join(missing)} (see "
                f"components/replay/hdf5.py); {_FIX_REWRITE}")
        try:
            info = _info_from_attrs(name, f.attrs)
        except (TypeError, ValueError) as error:
            raise DatasetError(f"dataset {name} has malformed attributes ({error}); "
                               f"{_FIX_REWRITE}") from None
        n, m = info.num_rows, info.num_episodes
        expected = {
            OBS: ((n, *info.obs_shape), (info.obs_dtype,)),
            ACTION: ((n, info.action_dim), ("float32",)),
            REWARD: ((n,), ("float32",)),
            TERMINATED: ((n,), ("bool",)),
            EPISODE: ((n,), ("int64",)),
            STARTS: ((m,), ("int64",)),
            LENGTHS: ((m,), ("int64",)),
        }
        for key, (shape, dtypes) in expected.items():
            dset = f[key]
            if tuple(dset.shape) != shape:
                raise DatasetError(
                    f"dataset {name}: /{key} has shape {tuple(dset.shape)} but the attributes "
                    f"(num_rows={n}, num_episodes={m}, obs_shape={info.obs_shape}, "
                    f"action_dim={info.action_dim}) require {shape}; the file is inconsistent. "
                    f"{_FIX_REWRITE[0].upper()}{_FIX_REWRITE[1:]}")
            if dset.dtype.name not in dtypes:
                raise DatasetError(f"dataset {name}: /{key} has dtype {dset.dtype.name}, "
                                   f"expected {dtypes[0]}; {_FIX_REWRITE}")
        if info.obs_dtype != ("uint8" if info.obs_type == "pixels" else "float32"):
            raise DatasetError(f"dataset {name}: obs_dtype {info.obs_dtype!r} does not match "
                               f"obs_type {info.obs_type!r}; {_FIX_REWRITE}")
        if info.num_transitions != n - m or info.env_steps != (n - m) * info.action_repeat:
            raise DatasetError(f"dataset {name}: num_transitions/env_steps attributes disagree "
                               f"with num_rows - num_episodes; {_FIX_REWRITE}")
        return info

    def _check_boundaries(self) -> None:
        lengths, starts = self.episode_lengths, self.episode_starts
        if lengths.size and int(lengths.min()) < 1:
            raise self._corrupt("an episode has fewer than 1 row in /episode_lengths")
        expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else lengths
        if not np.array_equal(starts, expected) or int(lengths.sum()) != self.info.num_rows:
            raise self._corrupt("/episode_starts and /episode_lengths do not tile the rows "
                                "(starts[i+1] must equal starts[i] + lengths[i], and the lengths "
                                "must sum to num_rows)")

    # ------------------------------------------------------------------ facts
    @property
    def spec(self) -> EnvSpec:
        """The EnvSpec recorded in the file (num_envs 1)."""
        return self.info.spec()

    @property
    def num_episodes(self) -> int:
        return self.info.num_episodes

    @property
    def num_transitions(self) -> int:
        return self.info.num_transitions

    @property
    def num_rows(self) -> int:
        return self.info.num_rows

    def __len__(self) -> int:
        return self.info.num_episodes

    def __repr__(self) -> str:
        i = self.info
        return (f"HDF5EpisodeDataset({str(self.path)!r}: task={i.task!r}, obs={i.obs_shape}, "
                f"A={i.action_dim}, {i.num_episodes} episodes, {i.num_transitions} transitions)")

    def check_fits(self, spec: EnvSpec, consumer: str = "the replay buffer", *,
                   fix: str = "or build the agent and buffer from the dataset's own spec "
                              "(HDF5EpisodeDataset(path).spec)") -> None:
        """Raise a DatasetError unless observations and actions fit `spec`."""
        i = self.info
        problems = []
        if tuple(spec.obs_shape) != i.obs_shape:
            problems.append(f"observations of shape {i.obs_shape}, but {consumer} expects "
                            f"{tuple(spec.obs_shape)}")
        if int(spec.action_dim) != i.action_dim:
            problems.append(f"{i.action_dim}-dim actions, but {consumer} expects "
                            f"{spec.action_dim}")
        if spec.obs_type != i.obs_type:
            problems.append(f"{i.obs_type} observations, but {consumer} expects {spec.obs_type}")
        if problems:
            task = f" (task {i.task!r})" if i.task else ""
            raise DatasetError(
                f"dataset {self.path}{task} holds {'; and '.join(problems)}. Use a dataset "
                f"recorded on the same task{f' ({spec.task!r})' if spec.task else ''}, {fix}")

    # ------------------------------------------------------------------ streaming
    def iter_episodes(self, *, chunk_episodes: int = 64,
                      indices: Sequence[int] | np.ndarray | None = None) -> Iterator[TensorDict]:
        """Yield episodes in file order as TensorDict[n+1] (CPU), reading in blocks.

        Each read covers at most `chunk_episodes` consecutive episodes of the file, so at
        most one block is in memory besides what the caller keeps.

        Args:
            chunk_episodes: episodes per read.
            indices: episode indices to yield (any order; yielded sorted, each once);
                None yields all.

        Shapes: obs [n+1, *obs_shape], action [n+1, A], reward [n+1], terminated [n+1],
            episode [n+1].
        """
        if chunk_episodes < 1:
            raise ValueError(f"chunk_episodes must be >= 1, got {chunk_episodes}")
        m = self.num_episodes
        if indices is None:
            selected = np.arange(m, dtype=np.int64)
        else:
            selected = np.unique(np.asarray(indices, dtype=np.int64))
            if selected.size and (selected[0] < 0 or selected[-1] >= m):
                raise IndexError(f"episode indices must lie in [0, {m}) for {self.path}")
        starts, lengths = self.episode_starts, self.episode_lengths
        with self._open() as f:
            dsets = {k: f[k] for k in ROW_KEYS}
            # Windows of chunk_episodes consecutive episode indices; read the rows spanning
            # the selected episodes of each window.
            window_of = selected // chunk_episodes
            for window in np.unique(window_of):
                group = selected[window_of == window]
                lo = int(starts[group[0]])
                hi = int(starts[group[-1]] + lengths[group[-1]])
                block = self._read(dsets, lo, hi)  # each [hi - lo, ...]
                for i in group.tolist():
                    a = int(starts[i]) - lo
                    b = a + int(lengths[i])
                    rows = {k: torch.from_numpy(v[a:b]) for k, v in block.items()}
                    if not bool((rows[EPISODE] == rows[EPISODE][0]).all()):
                        raise self._corrupt(f"episode {i} (rows {lo + a}:{lo + b}) has more "
                                            "than one id in /episode")
                    yield TensorDict(rows, batch_size=[b - a])
                del block

    def _read(self, dsets: dict[str, h5py.Dataset], lo: int, hi: int) -> dict[str, np.ndarray]:
        self.num_reads += 1
        self.max_rows_read = max(self.max_rows_read, hi - lo)
        try:
            return {k: d[lo:hi] for k, d in dsets.items()}
        except OSError as error:
            raise self._corrupt(f"reading rows {lo}:{hi} failed ({error})") from None


def load_into(replay: Any, paths: Sequence[str | os.PathLike[str] | HDF5EpisodeDataset], *,
              chunk_episodes: int = 64,
              indices: Sequence[Sequence[int] | None] | None = None) -> int:
    """Stream the episodes of one or more datasets into `replay`; return how many were added.

    Every file is opened and checked against `replay.spec` (observation shape and type,
    action dimension) before the first episode is added. Episodes are then read in blocks
    of `chunk_episodes` and added one by one, so neither a whole file nor a second copy of
    the buffer is ever in memory.

    Args:
        replay: a buffer with `add(episode)` and a `spec` (e.g. `EpisodeSliceBuffer`).
        paths: files (or opened datasets), loaded in order.
        indices: per file, the episode indices to load (None: all).

    Raises:
        DatasetError: a file is missing, unreadable, not in the format, or does not fit.
    """
    datasets = [p if isinstance(p, HDF5EpisodeDataset) else HDF5EpisodeDataset(p)
                for p in paths]
    if indices is not None and len(indices) != len(datasets):
        raise ValueError(f"indices has {len(indices)} entries for {len(datasets)} datasets")
    spec = getattr(replay, "spec", None)
    if spec is not None:
        for dataset in datasets:
            dataset.check_fits(spec, f"the replay buffer ({type(replay).__name__})")
    rows = sum(d.num_rows if indices is None or indices[i] is None
               else int(d.episode_lengths[np.unique(np.asarray(indices[i], np.int64))].sum())
               for i, d in enumerate(datasets))
    capacity = getattr(replay, "capacity", None)
    if capacity is not None and rows > capacity:
        _log.warning("loading %d rows into a buffer of capacity %d: the oldest episodes will be "
                     "dropped; raise the buffer's capacity to keep them all", rows, capacity)
    added = 0
    for i, dataset in enumerate(datasets):
        chosen = None if indices is None else indices[i]
        for episode in dataset.iter_episodes(chunk_episodes=chunk_episodes, indices=chosen):
            replay.add(episode)
            added += 1
    return added
