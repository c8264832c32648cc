"""The offline pipeline: HDF5 episode datasets -> replay -> updates, with validation.

`OfflineRunner` trains a TD-MPC2-family agent from one or more HDF5 episode datasets
(format: `components/replay/hdf5.py`), for instance those exported by online runs. Whole
episodes are held out for validation (a split fixed by the seed); their losses are logged
under `validation/` in TensorBoard. When an env is bound (the task is known), the agent
is evaluated in the real environment at a cadence of updates.

Steps: every `step` of this runner (TensorBoard, `eval.csv`, checkpoint folders
`step_<n>`, the progress bar) counts *updates*, not env steps: the data's env steps are
fixed (`env_steps` attribute of each file). The run directory is laid out as in
runners/base.py; its `run.json` also lists the datasets (path, episodes, env steps, ...)
and the split sizes.

Resuming: the replay and validation buffers are rebuilt from the files (same split, same
order, so the same ring layout), and the checkpoint restores the agent, the samplers'
generator states, the counters and the global RNG states; a resumed run continues exactly
as an uninterrupted one. Checkpoints hold no data, only a fingerprint of each file, and a
run refuses to resume when a file changed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np
import torch

from components.replay.hdf5 import DatasetError, HDF5EpisodeDataset, load_into
from rlcore import checks
from rlcore.types import EnvSpec
from runners.base import RunnerBase
from runners.common import RunError
from runners.rollouts import EVAL_SEED_OFFSET

_log = logging.getLogger("runners")


def _sampler_state(buffer: Any) -> dict[str, Any]:
    """The sampling RNG state of a replay buffer (its data is rebuilt from the files)."""
    if hasattr(buffer, "sampler_state_dict"):
        return buffer.sampler_state_dict()
    generator = getattr(buffer, "_generator", None)
    if isinstance(generator, torch.Generator):
        return {"generator_state": generator.get_state()}
    return {}


def _load_sampler_state(buffer: Any, state: dict[str, Any]) -> None:
    if hasattr(buffer, "load_sampler_state_dict"):
        buffer.load_sampler_state_dict(state)
    elif "generator_state" in state:
        buffer._generator.set_state(state["generator_state"])


def _fingerprint(dataset: HDF5EpisodeDataset) -> dict[str, Any]:
    i = dataset.info
    return {"path": str(dataset.path), "num_episodes": i.num_episodes, "num_rows": i.num_rows,
            "env_steps": i.env_steps, "created_at": i.created_at, "task": i.task}


@gin.configurable
class OfflineRunner(RunnerBase):
    """Offline TD-MPC2 training from HDF5 episode datasets, with validation and evaluation.

    Args:
        run_dir: where the run lives; an existing run directory is resumed.
        datasets: HDF5 episode datasets (paths), loaded in order; all must share the
            observation shape and type and the action dimension. The agent's EnvSpec comes
            from the first file's attributes.
        agent, replay: gin references (classes), built with run-time values; `replay` is
            called with `capacity` = the rows it must hold.
        env: gin reference of the env used for evaluation (e.g. `@envs.EnvpoolVecEnv`);
            None trains without evaluation. Its spec must match the data's.
        seed: the run's seed (also fixes the validation split).
        total_updates: updates of the run.
        validation_fraction: share of whole episodes (over all files) held out for
            validation; 0 (or validation_batches = 0) holds out none. At least one episode
            stays for training.
        validation_every: updates between validation passes (0: only at the end).
        validation_batches: batches scored per validation pass (0 disables validation).
        eval_every: updates between evaluations in the env (0: only at the end).
        eval_episodes: episodes per evaluation (run as parallel envs; 0 disables).
        eval_policy_prior: also evaluate the policy prior alone.
        checkpoint_every: updates between checkpoints (one is always written at the end).
        keep_checkpoints: complete checkpoints kept.
        log_every: updates between logged update metrics.
        chunk_episodes: episodes read from a file at once while loading.
        device: `auto` (CUDA when present), `cpu`, `cuda`, ...
        num_threads: torch CPU threads (None leaves torch's default).
        progress: show a progress bar (over updates).
    """

    SOURCE = "dataset"
    COUNTERS = ("last_eval", "last_validation", "next_eval", "next_validation",
                "next_checkpoint")

    def __init__(self, run_dir: str, *, datasets: Sequence[str], agent: Callable[..., Any],
                 replay: Callable[..., Any], env: Callable[..., Any] | None = None,
                 seed: int = 1, total_updates: int = 100_000,
                 validation_fraction: float = 0.05, validation_every: int = 5_000,
                 validation_batches: int = 10, eval_every: int = 10_000,
                 eval_episodes: int = 10, eval_policy_prior: bool = True,
                 checkpoint_every: int = 10_000, keep_checkpoints: int = 2,
                 log_every: int = 100, chunk_episodes: int = 64, device: str = "auto",
                 num_threads: int | None = None, progress: bool = True):
        o = "OfflineRunner"
        seed = checks.integer(o, "seed", seed)
        total_updates = checks.integer(o, "total_updates", total_updates, at_least=1)
        validation_fraction = checks.number(o, "validation_fraction", validation_fraction,
                                            low=0, high=1, high_open=True)
        validation_every = checks.integer(o, "validation_every", validation_every, at_least=0)
        validation_batches = checks.integer(o, "validation_batches", validation_batches,
                                            at_least=0)
        eval_every = checks.integer(o, "eval_every", eval_every, at_least=0)
        eval_episodes = checks.integer(o, "eval_episodes", eval_episodes, at_least=0)
        checkpoint_every = checks.integer(o, "checkpoint_every", checkpoint_every, at_least=0)
        keep_checkpoints = checks.integer(o, "keep_checkpoints", keep_checkpoints, at_least=1)
        log_every = checks.integer(o, "log_every", log_every, at_least=1)
        chunk_episodes = checks.integer(o, "chunk_episodes", chunk_episodes, at_least=1)
        if num_threads is not None:
            num_threads = checks.integer(o, "num_threads", num_threads, at_least=1)
        if isinstance(datasets, (str, Path)):
            datasets = [datasets]
        if not datasets:
            raise RunError("no datasets to train on: pass --dataset=FILE.h5 (repeatable) or "
                           "bind OfflineRunner.datasets = ['FILE.h5']")
        super().__init__(run_dir, seed, device, num_threads, progress, log_every,
                         validation_batches, eval_policy_prior)
        self.total_updates, self.validation_every = total_updates, validation_every
        self.eval_every, self.eval_episodes = eval_every, eval_episodes
        self.checkpoint_every, self.chunk_episodes = checkpoint_every, chunk_episodes

        # Open every file (schema checks only; the data streams in at `run`) and derive
        # the spec. Everything is built before anything is written.
        try:
            self.datasets = [HDF5EpisodeDataset(p) for p in datasets]
            self.spec: EnvSpec = self.datasets[0].spec
            for dataset in self.datasets[1:]:
                dataset.check_fits(self.spec, f"the first dataset ({self.datasets[0].path})",
                                   fix="or drop one of them from --dataset / "
                                       "OfflineRunner.datasets")
        except DatasetError as e:
            raise RunError(str(e)) from None
        self._check_tasks()
        self.fingerprints = [_fingerprint(d) for d in self.datasets]

        # Evaluation env: checked against the data now, rebuilt for every evaluation.
        self._env_factory = env if (env is not None and eval_episodes > 0) else None
        if self._env_factory is not None:
            probe = self._make_eval_env()
            try:
                self._check_env_spec(probe.spec)
            finally:
                probe.close()

        self.agent = agent(self.spec, self.device)
        self.train_indices, self.val_indices = self._split(
            validation_fraction if validation_batches else 0.0)
        train_rows = self._rows(self.train_indices)
        val_rows = self._rows(self.val_indices)
        self.replay = replay(self.spec, seed=seed, device=self.device, capacity=train_rows)
        self.validation = (replay(self.spec, seed=seed + 1, device=self.device,
                                  capacity=val_rows)
                           if val_rows and validation_batches else None)
        self._open_run_dir(keep_checkpoints)

        # Counters (in updates).
        self.last_eval = -1
        self.last_validation = -1
        self.next_eval = eval_every or math.inf
        self.next_validation = validation_every or math.inf
        self.next_checkpoint = checkpoint_every or math.inf

    # -- data -------------------------------------------------------------------------
    def _check_tasks(self) -> None:
        tasks = {d.info.task for d in self.datasets if d.info.task}
        if len(tasks) > 1:
            _log.warning("the datasets come from different tasks %s; training on all of them "
                         "with the first file's spec", sorted(tasks))
        repeats = {d.info.action_repeat for d in self.datasets}
        if len(repeats) > 1:
            raise RunError(f"the datasets use different action repeats {sorted(repeats)} "
                           f"({', '.join(str(d.path) for d in self.datasets)}); one dynamics "
                           "model cannot fit both: train on files of one action repeat")

    def _check_env_spec(self, env_spec: EnvSpec) -> None:
        data = self.spec
        where = f"the dataset {self.datasets[0].path}"
        problems = []
        if tuple(env_spec.obs_shape) != tuple(data.obs_shape):
            problems.append(f"observations {tuple(env_spec.obs_shape)} (data: "
                            f"{tuple(data.obs_shape)})")
        if env_spec.action_dim != data.action_dim:
            problems.append(f"{env_spec.action_dim}-dim actions (data: {data.action_dim})")
        if env_spec.action_repeat != data.action_repeat:
            problems.append(f"action repeat {env_spec.action_repeat} (data: "
                            f"{data.action_repeat})")
        if env_spec.obs_type != data.obs_type:
            problems.append(f"{env_spec.obs_type} observations (data: {data.obs_type})")
        if problems:
            raise RunError(
                f"the evaluation env (task {env_spec.task!r}) does not fit {where} (task "
                f"{data.task!r}): it has {'; '.join(problems)}. Set TASK (or "
                f"OfflineRunner.env) to the data's task, e.g. --gin_param=\"TASK = "
                f"'{data.task}'\", or bind OfflineRunner.env = None to train without "
                "evaluation")
        if data.task and env_spec.task and env_spec.task != data.task:
            _log.warning("evaluating on task %r, but the data come from %r", env_spec.task,
                         data.task)
        if env_spec.episode_length != data.episode_length:
            _log.warning("the evaluation env's episodes last %d agent steps, the data's %d",
                         env_spec.episode_length, data.episode_length)

    def _split(self, fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Whole episodes over all files, held out at random with the run's seed.

        Returns per-file sorted episode indices (training, validation).
        """
        counts = [d.num_episodes for d in self.datasets]
        total = sum(counts)
        if total == 0:
            raise RunError(f"the datasets hold no episodes "
                           f"({', '.join(str(d.path) for d in self.datasets)})")
        num_val = 0
        if fraction > 0 and total >= 2:
            num_val = min(max(1, round(fraction * total)), total - 1)
        generator = torch.Generator().manual_seed(self.seed)
        held_out = np.zeros(total, dtype=bool)
        held_out[torch.randperm(total, generator=generator)[:num_val].numpy()] = True
        offsets = np.concatenate([[0], np.cumsum(counts)])
        train, val = [], []
        for i in range(len(self.datasets)):
            mask = held_out[offsets[i]:offsets[i + 1]]
            train.append(np.flatnonzero(~mask))
            val.append(np.flatnonzero(mask))
        return train, val

    def _rows(self, indices: list[np.ndarray]) -> int:
        return int(sum(d.episode_lengths[idx].sum() for d, idx in zip(self.datasets, indices)))

    def _load_data(self) -> None:
        """Stream the training and validation episodes into their buffers."""
        t0 = time.perf_counter()
        try:
            load_into(self.replay, self.datasets, chunk_episodes=self.chunk_episodes,
                      indices=self.train_indices)
            if self.validation is not None:
                load_into(self.validation, self.datasets, chunk_episodes=self.chunk_episodes,
                          indices=self.val_indices)
        except DatasetError as e:
            raise RunError(str(e)) from None
        horizon = getattr(self.replay, "horizon", None)
        if getattr(self.replay, "num_valid_starts", 1) == 0:
            raise RunError(f"no training episode has horizon+1 = {horizon + 1} rows; use longer "
                           "episodes or a shorter horizon")
        if self.validation is not None and getattr(self.validation, "num_valid_starts", 1) == 0:
            _log.warning("no validation episode has horizon+1 = %s rows; validation is off",
                         horizon + 1)
            self.validation = None
        train_episodes = sum(len(i) for i in self.train_indices)
        _log.info("loaded %d training episodes (%d transitions) and %d validation episodes "
                  "from %d file(s) in %.1f s", train_episodes,
                  self._rows(self.train_indices) - train_episodes,
                  sum(len(i) for i in self.val_indices), len(self.datasets),
                  time.perf_counter() - t0)

    # -- run directory and checkpoints ------------------------------------------------
    def _run_meta(self) -> dict[str, Any]:
        return {"step_unit": "updates",
                "datasets": [{**fp, "framework_version": d.info.framework_version}
                             for fp, d in zip(self.fingerprints, self.datasets)],
                "split": {"train_episodes": int(sum(len(i) for i in self.train_indices)),
                          "validation_episodes": int(sum(len(i) for i in self.val_indices))}}

    def _data_state(self) -> dict[str, Any]:
        return {"sampler": {"replay": _sampler_state(self.replay),
                            "validation": (_sampler_state(self.validation)
                                           if self.validation is not None else {})},
                "datasets": self.fingerprints}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [{k: v for k, v in fp.items() if k != "path"} for fp in state["datasets"]]
        now = [{k: v for k, v in fp.items() if k != "path"} for fp in self.fingerprints]
        if saved != now:
            changed = [fp["path"] for fp, a, b in zip(self.fingerprints, saved, now) if a != b]
            raise RunError(
                f"the datasets changed since the checkpoint in {self.checkpointer.directory} "
                f"was written ({', '.join(changed) or 'a different number of files'}); resume "
                "with the original files, or start a new --run_dir")
        super().load_state_dict(state)

    def _load_data_state(self, state: dict[str, Any]) -> None:
        _load_sampler_state(self.replay, state["sampler"]["replay"])
        if self.validation is not None:
            _load_sampler_state(self.validation, state["sampler"]["validation"])

    # -- phases -----------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Every loss on held-out episodes, without gradients or training-state changes."""
        self.last_validation = self.num_updates
        if self.validation is None or not self.validation_batches:
            return {}
        return self._validation_pass("validation", self.validation)

    def _make_eval_env(self):
        return self._env_factory(num_envs=self.eval_episodes,
                                 seed=self.seed + EVAL_SEED_OFFSET)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`eval_episodes` episodes with the deterministic planner (and the policy prior).

        The env is rebuilt with the same seed and torch's RNG is forked and seeded for
        every evaluation, so evaluations neither depend on nor disturb training's random
        stream (a resumed run evaluates exactly as an uninterrupted one).
        """
        self.last_eval = self.num_updates
        if self._env_factory is None:
            return {}
        env = self._make_eval_env()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed + EVAL_SEED_OFFSET)
                return self._evaluate_in(env)[0]
        finally:
            env.close()

    # -- the schedule -----------------------------------------------------------------
    def run(self) -> None:
        self._load_data()
        if not self._begin(self.total_updates):
            return
        update_time = 0.0
        while self.num_updates < self.total_updates:
            t0 = time.perf_counter()
            metrics = self.agent.update(self.replay.sample(), "full")
            self._note_update(metrics)
            update_time += time.perf_counter() - t0
            if self.num_updates % self.log_every == 0:
                self._log_update(metrics)
            if self.num_updates >= self.next_validation:
                self.validate()
                self.next_validation += self.validation_every
            if self.num_updates >= self.next_eval:
                self.evaluate()
                self.next_eval += self.eval_every
            if self.num_updates >= self.next_checkpoint:
                self.save()
                self.next_checkpoint += self.checkpoint_every
            self._advance("updates_per_second", {"update": update_time})
            self._check_stop()
        if self.validation is not None and self.last_validation < self.num_updates:
            self.validate()
        if self._env_factory is not None and self.last_eval < self.num_updates:
            self.evaluate()
        self.save()
        self.logger.scalars("time", {"update": update_time}, self.num_updates)
        self.logger.close()
