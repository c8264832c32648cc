"""The gin-configurable pipelines. Entry points in `runners/*.py` stay thin.

`OnlineRunner` reads top to bottom like a CleanRL loop: collect with the agent over E
envs, seed with random actions, pretrain, then a fixed number of updates per env step,
evaluate, checkpoint. Helpers do the work; `run` shows the schedule.

Run directory:

    run_dir/
      config.gin          operative gin config (resume and evaluation rebuild from it)
      run.json            env spec, seed, device, versions
      eval.csv            step,reward,seed,... (env steps, like ../shared/reference)
      tb/                 TensorBoard events
      checkpoints/step_<n>/{state.pt, COMPLETE}
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import gin
import numpy as np
import torch
from tensordict import TensorDict

from rlcore.checkpointing import CheckpointError, Checkpointer
from rlcore.logging import MetricLogger
from rlcore.seeding import rng_state, seed_everything, set_rng_state
from rlcore.types import (ACTION, DONE, EPISODE, NEXT_EPISODE, NEXT_OBS, OBS, REWARD,
                          TERMINATED, EnvSpec)
from runners.common import CONFIG_FILE, RunError, select_device

_log = logging.getLogger("runners")


def _strip_comments(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def check_run_dir(run_dir: Path, operative_config: str) -> None:
    """Refuse a run dir whose saved config.gin differs from `operative_config`.

    Every saved binding must be unchanged. Bindings only the new config has (a parameter
    added to the code since, at its default) are accepted with a warning.
    """
    saved = run_dir / CONFIG_FILE
    if not saved.exists():
        return
    new = set(_strip_comments(operative_config))
    old = set(_strip_comments(saved.read_text()))
    if old - new:
        diff = [f"  - {ln}" for ln in sorted(old - new)] + [f"  + {ln}" for ln in sorted(new - old)]
        raise RunError(
            f"--run_dir {run_dir} holds a run with a different config:\n" + "\n".join(diff[:20])
            + "\nResume it with its own config (pass no --gin_file, or the same files and "
            "bindings), or choose a new --run_dir.")
    if new - old:
        _log.warning("resuming %s with bindings its config.gin lacks (new parameters at their "
                     "defaults): %s", run_dir, "; ".join(sorted(new - old)))


class EpisodeBuilder:
    """Collects the rows of the E in-flight episodes; hands back each one as it ends.

    Rows follow the arrival convention: the first row holds the first observation with a
    NaN action and reward.
    """

    def __init__(self, num_envs: int):
        self.rows: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(num_envs)]

    def start(self, i: int, obs: torch.Tensor, episode: torch.Tensor, action_dim: int) -> None:
        self.rows[i] = [{OBS: obs, ACTION: torch.full((action_dim,), float("nan")),
                         REWARD: torch.tensor(float("nan")), TERMINATED: torch.tensor(False),
                         EPISODE: episode}]

    def append(self, i: int, obs, action, reward, terminated, episode) -> None:
        self.rows[i].append({OBS: obs, ACTION: action, REWARD: reward,
                             TERMINATED: terminated, EPISODE: episode})

    def finish(self, i: int) -> TensorDict:
        rows = self.rows[i]
        return TensorDict({k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                          batch_size=[len(rows)])


@gin.configurable
class OnlineRunner:
    """Online TD-MPC2 training: envs -> agent -> replay -> updates, with evaluation.

    Args:
        run_dir: where the run lives; an existing run directory is resumed.
        env, agent, replay: gin references (classes), built with run-time values.
        seed: the run's seed.
        total_env_steps: env steps of the run, summed over envs (action repeat included).
        seed_steps: agent steps (summed over envs) of uniform random actions before the
            first update; None means max(1000, 5 * episode_length) (SPEC §6).
        pretrain_updates: full updates run once when seeding ends; None means seed_steps
            (TD-MPC2's choice).
        utd_ratio: full updates per agent step per env after seeding.
        policy_updates, actor_critic_updates: policy-only and actor-critic updates per
            agent step per env (variant update pathways); fractional counts accumulate.
        eval_every: env steps between evaluations (0 disables periodic evaluation).
        eval_episodes: episodes per evaluation (run as parallel eval envs).
        eval_policy_prior: also evaluate the policy prior alone.
        checkpoint_every: env steps between checkpoints (one is always written at the end).
        log_every: updates between logged update metrics.
        device: `auto` (CUDA when present), `cpu`, `cuda`, ...
        num_threads: torch CPU threads (None leaves torch's default).
        progress: show a progress bar.
        validation_batches: batches per held-out buffer scored after each evaluation
            (variant): evaluation episodes fill an `all` and a `recent` buffer and every
            loss is computed there without changing any training state; 0 disables.
        validation_capacity: rows kept in the `all` validation buffer.
        eval_videos: episodes recorded as mp4 (run_dir/videos) and TensorBoard GIFs at each
            evaluation (envpool tasks render through dm_control); 0 disables.
        video_size: video resolution in pixels.
        export_dataset: write the replay buffer to this HDF5 file at the end of the run
            (format in components/replay/hdf5.py); None: no export.
    """

    def __init__(self, run_dir: str, *, env: Callable[..., Any], agent: Callable[..., Any],
                 replay: Callable[..., Any], seed: int = 1, total_env_steps: int = 1_000_000,
                 seed_steps: int | None = None, pretrain_updates: int | None = None,
                 utd_ratio: float = 1.0,
                 policy_updates: float = 0.0, actor_critic_updates: float = 0.0,
                 eval_every: int = 50_000, eval_episodes: int = 10,
                 eval_policy_prior: bool = True, checkpoint_every: int = 100_000,
                 keep_checkpoints: int = 2, log_every: int = 100, device: str = "auto",
                 num_threads: int | None = None, progress: bool = True,
                 validation_batches: int = 0, validation_capacity: int = 100_000,
                 eval_videos: int = 0, video_size: int = 256,
                 export_dataset: str | None = None):
        self.schedule = {"full": utd_ratio, "actor_critic": actor_critic_updates,
                         "policy": policy_updates}
        for name, count in self.schedule.items():
            if not count >= 0:
                raise RunError(f"update counts must be >= 0 per agent step, got {name} = "
                               f"{count}; fix OnlineRunner.utd_ratio / policy_updates / "
                               "actor_critic_updates")
        if validation_batches < 0:
            raise RunError(f"OnlineRunner.validation_batches must be >= 0, got "
                           f"{validation_batches}")
        if total_env_steps <= 0:
            raise RunError(f"OnlineRunner.total_env_steps must be > 0, got {total_env_steps}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.run_dir = Path(run_dir)
        self.seed, self.total_env_steps = seed, total_env_steps
        self.validation_batches = validation_batches
        self.eval_videos, self.video_size = eval_videos, video_size
        self.export_dataset = export_dataset
        self.eval_every, self.eval_episodes = eval_every, eval_episodes
        self.eval_policy_prior = eval_policy_prior
        self.checkpoint_every, self.log_every, self.progress = checkpoint_every, log_every, progress
        self.device = select_device(device)
        seed_everything(seed)
        # Build everything before anything is written, so a bad config fails cleanly.
        self.env = env(seed=seed)
        self.spec: EnvSpec = self.env.spec
        self.env_factory = env  # builds more envs of this task: env_factory(num_envs=, seed=)
        self.agent = agent(self.spec, self.device)
        self.replay = replay(self.spec, seed=seed, device=self.device)
        self.seed_steps = seed_steps if seed_steps is not None else max(
            1000, 5 * self.spec.episode_length)
        if pretrain_updates is not None and pretrain_updates < 0:
            raise RunError(f"OnlineRunner.pretrain_updates must be >= 0 (or None), got "
                           f"{pretrain_updates}")
        self.pretrain_updates = self.seed_steps if pretrain_updates is None else pretrain_updates
        self.eval_env = env(num_envs=eval_episodes, seed=seed + 100_000) \
            if eval_every or eval_episodes else None
        self._replay_factory = replay
        self.validation = {
            "validation_all": replay(self.spec, seed=seed + 1, device=self.device,
                                     capacity=validation_capacity),
            "validation_recent": None,
        } if validation_batches else {}
        self.operative_config = gin.operative_config_str()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=keep_checkpoints)
        check_run_dir(self.run_dir, self.operative_config)
        # Counters (env steps include the action repeat and are summed over envs).
        self.env_step = 0
        self.agent_steps = 0
        self.pretrained = False
        self.update_credit = {name: 0.0 for name in self.schedule}
        self.last_eval_step = -1
        self.next_eval = eval_every if eval_every else math.inf
        self.next_checkpoint = checkpoint_every if checkpoint_every else math.inf
        # Wall time per part of the loop (seconds), and marks around the steady phase.
        self.timers = {k: 0.0 for k in ("env", "plan", "update", "replay", "log", "eval",
                                        "checkpoint")}
        self.steady_start: dict[str, Any] | None = None
        self.steady_end: dict[str, Any] | None = None

    @property
    def num_updates(self) -> int:
        return self.agent.num_updates

    # -- throughput -------------------------------------------------------------------
    def _time_mark(self) -> dict[str, Any]:
        return {"time": time.perf_counter(), "env_step": self.env_step,
                "num_updates": self.num_updates, "timers": dict(self.timers)}

    def throughput(self) -> dict[str, Any] | None:
        """Env steps/s and the share of wall time per part (env, plan, update, replay,
        log, eval, checkpoint, other) from the end of pretraining to the end of the loop
        of the last `run()`; None when the run never got past pretraining."""
        start, end = self.steady_start, self.steady_end
        if start is None or end is None or end["env_step"] <= start["env_step"]:
            return None
        wall = end["time"] - start["time"]
        parts = {k: end["timers"][k] - start["timers"].get(k, 0.0) for k in end["timers"]}
        parts["other"] = max(wall - sum(parts.values()), 0.0)
        return {"env_steps": end["env_step"] - start["env_step"],
                "updates": end["num_updates"] - start["num_updates"], "seconds": wall,
                "env_steps_per_second": (end["env_step"] - start["env_step"]) / wall,
                "share": {k: v / wall for k, v in parts.items()}, "seconds_per_part": parts}

    # -- run directory ----------------------------------------------------------------
    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.run_dir / CONFIG_FILE
        if not cfg.exists():
            tmp = cfg.with_suffix(".tmp")
            tmp.write_text(self.operative_config)
            tmp.replace(cfg)
        meta = {"spec": self.spec.to_dict(), "seed": self.seed, "device": str(self.device),
                "torch": torch.__version__}
        (self.run_dir / "run.json").write_text(json.dumps(meta, indent=2))

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent.state_dict(),
            "replay": self.replay.state_dict(),
            "env": self.env.state_dict() if hasattr(self.env, "state_dict") else {},
            "counters": {"env_step": self.env_step, "agent_steps": self.agent_steps,
                         "pretrained": self.pretrained,
                         "update_credit": self.update_credit,
                         "last_eval_step": self.last_eval_step,
                         "next_eval": self.next_eval, "next_checkpoint": self.next_checkpoint},
            "rng": rng_state(),
            "validation": {k: b.state_dict() for k, b in self.validation.items() if b is not None},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self.replay.load_state_dict(state["replay"])
        if state.get("env") and hasattr(self.env, "load_state_dict"):
            self.env.load_state_dict(state["env"])
        for k, v in state["counters"].items():
            setattr(self, k, v)
        set_rng_state(state["rng"])
        for name, buf_state in state.get("validation", {}).items():
            if self.validation.get(name) is None:
                self.validation[name] = self._new_validation_buffer()
            self.validation[name].load_state_dict(buf_state)

    def _maybe_resume(self) -> None:
        if self.checkpointer.latest() is None:
            return
        try:
            state = self.checkpointer.load()
        except CheckpointError as e:
            raise RunError(str(e)) from None
        self.load_state_dict(state)
        _log.info("resumed %s from env step %d (%d updates)", self.run_dir, self.env_step,
                  self.num_updates)

    def save(self) -> None:
        self.checkpointer.save(self.env_step, self.state_dict())

    # -- phases -----------------------------------------------------------------------
    def _collect(self, obs: torch.Tensor, is_first: torch.Tensor, builder: EpisodeBuilder,
                 timers: dict[str, float]):
        """One agent step in each of the E envs; finished episodes go to the replay."""
        t0 = time.perf_counter()
        if self.agent_steps < self.seed_steps:
            action = torch.rand(self.spec.num_envs, self.spec.action_dim) * 2 - 1  # [E, A]
        else:
            action = self.agent.act(obs, is_first)  # [E, A]
        t1 = time.perf_counter()
        td = self.env.step(action)
        t2 = time.perf_counter()
        timers["plan"] += t1 - t0
        timers["env"] += t2 - t1
        self.agent_steps += self.spec.num_envs
        self.env_step += self.spec.num_envs * self.spec.action_repeat
        for i in range(self.spec.num_envs):
            builder.append(i, td[OBS][i], action[i], td[REWARD][i], td[TERMINATED][i],
                           td[EPISODE][i])
            if td[DONE][i]:
                episode = builder.finish(i)
                self.replay.add(episode)
                ret = float(episode[REWARD][1:].sum())
                self.logger.episode(ret, len(episode) - 1, self.env_step)
                builder.start(i, td[NEXT_OBS][i], td[NEXT_EPISODE][i], self.spec.action_dim)
        timers["replay"] += time.perf_counter() - t2
        return td[NEXT_OBS], td[DONE].clone()

    def _updates_due(self) -> dict[str, int]:
        """Updates per pathway for this step: pretraining once, then the schedule's counts."""
        if self.agent_steps < self.seed_steps or self.replay.num_episodes == 0:
            return {}
        if not self.pretrained:
            self.pretrained = True
            _log.info("pretraining: %d full updates on %d seed steps", self.pretrain_updates,
                      self.agent_steps)
            return {"full": self.pretrain_updates}
        due = {}
        for name, count in self.schedule.items():
            self.update_credit[name] += self.spec.num_envs * count
            due[name] = int(self.update_credit[name])
            self.update_credit[name] -= due[name]
        return due

    def _update(self, due: dict[str, int], timers: dict[str, float]) -> None:
        for pathway, n in due.items():
            for _ in range(n):
                t0 = time.perf_counter()
                batch = self.replay.sample()
                t1 = time.perf_counter()
                metrics = self.agent.update(batch, pathway)
                t2 = time.perf_counter()
                if self.num_updates % self.log_every == 0:
                    self._log_update(metrics)
                timers["replay"] += t1 - t0
                timers["update"] += t2 - t1
                timers["log"] += time.perf_counter() - t2

    def _log_update(self, metrics: TensorDict) -> None:
        values = {k: v for k, v in metrics.items()}
        bad = [k for k, v in values.items() if k.startswith("loss_") and not torch.isfinite(v)]
        if bad:
            raise RunError(
                f"non-finite loss at update {self.num_updates} (env step {self.env_step}): "
                f"{', '.join(bad)}. The last checkpoint in {self.checkpointer.directory} is "
                "intact; lower the learning rate or check the rewards/observations, then resume.")
        self.logger.scalars("loss", {k: v for k, v in values.items() if k.startswith("loss_")},
                            self.env_step)
        self.logger.scalars("train", {k.split("/", 1)[1]: v for k, v in values.items()
                                      if k.startswith("stats/")}, self.env_step)
        self.logger.scalars("grad", {k.split("/", 1)[1]: v for k, v in values.items()
                                     if k.startswith("grad/")}, self.env_step)
        self.logger.scalars("train", {"num_updates": self.num_updates}, self.env_step)
        if self.agent.planner.last_stats:
            self.logger.scalars("plan", self.agent.planner.last_stats, self.env_step)

    def _new_validation_buffer(self):
        return self._replay_factory(self.spec, seed=self.seed + 2, device=self.device,
                                    capacity=self.validation["validation_all"].capacity)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """E_eval episodes with the deterministic planner (and the policy prior alone)."""
        results: dict[str, float] = {}
        modes = [("reward", True)] + ([("reward_policy", False)] if self.eval_policy_prior else [])
        for name, use_planner in modes:
            returns, lengths, episodes = _run_episodes(self.eval_env, self.agent, use_planner)
            results[name] = float(np.mean(returns))
            if name == "reward":
                results["reward_std"] = float(np.std(returns))
                results["episode_length"] = float(np.mean(lengths))
                if self.validation:
                    self._store_validation(episodes)
        self.logger.eval(self.env_step, results["reward"],
                         **{k: v for k, v in results.items() if k != "reward"})
        self.last_eval_step = self.env_step
        _log.info("eval at env step %d: %s", self.env_step,
                  ", ".join(f"{k}={v:.1f}" for k, v in results.items()))
        if self.validation:
            self.validate()
        if self.eval_videos:
            from runners.evaluation import record_videos

            record_videos(self.env_factory, self.env, self.agent, self.run_dir, self.env_step,
                          episodes=self.eval_videos, size=self.video_size,
                          seed=self.seed + 100_000, tb_writer=self.logger.writer)
        return results

    def _store_validation(self, episodes: list[TensorDict]) -> None:
        """Evaluation episodes go to the `all` buffer and replace the `recent` one."""
        self.validation["validation_recent"] = self._new_validation_buffer()
        for ep in episodes:
            self.validation["validation_all"].add(ep)
            self.validation["validation_recent"].add(ep)

    def validate(self) -> dict[str, dict[str, float]]:
        """Every loss on held-out batches, without gradients or training-state changes."""
        out = {}
        for name, buf in self.validation.items():
            if buf is None or buf.num_valid_starts == 0:
                continue
            terms = [self.agent.validate(buf.sample()) for _ in range(self.validation_batches)]
            mean = {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0].keys()}
            self.logger.scalars(name, mean, self.env_step)
            out[name] = {k: float(v) for k, v in mean.items()}
        return out

    def _export(self) -> None:
        from components.replay.hdf5 import DatasetError, export_replay

        try:
            export_replay(self.replay, self.spec, self.export_dataset, overwrite=True,
                          source=str(self.run_dir.resolve()), source_env_step=self.env_step,
                          source_updates=self.num_updates, seed=self.seed)
        except DatasetError as e:
            raise RunError(str(e)) from None
        _log.info("exported the replay buffer to %s", self.export_dataset)

    # -- the schedule -----------------------------------------------------------------
    def run(self) -> None:
        self._maybe_resume()
        self._write_run_files()
        self.logger = MetricLogger(self.run_dir, total_steps=self.total_env_steps, seed=self.seed,
                                   progress=self.progress, resume_step=self.env_step)
        if self.env_step == 0:
            self.logger.config(self.operative_config)
        timers = self.timers
        builder = EpisodeBuilder(self.spec.num_envs)
        td = self.env.reset()
        for i in range(self.spec.num_envs):
            builder.start(i, td[OBS][i], td[EPISODE][i], self.spec.action_dim)
        obs, is_first = td[OBS], torch.ones(self.spec.num_envs, dtype=torch.bool)
        last_time, last_step = time.perf_counter(), self.env_step
        while self.env_step < self.total_env_steps:
            obs, is_first = self._collect(obs, is_first, builder, timers)
            self._update(self._updates_due(), timers)
            if self.pretrained and self.steady_start is None:  # pretraining just ended
                self.steady_start = self._time_mark()
            t0 = time.perf_counter()
            if self.env_step >= self.next_eval:
                self.evaluate()
                self.next_eval += self.eval_every
            t1 = time.perf_counter()
            if self.env_step >= self.next_checkpoint:
                self.next_checkpoint += self.checkpoint_every  # before saving: resume moves on
                self.save()
            t2 = time.perf_counter()
            self.logger.advance(self.env_step)
            if time.perf_counter() - last_time > 30:
                now = time.perf_counter()
                self.logger.scalars("time", {**timers, "env_steps_per_second":
                                             (self.env_step - last_step) / (now - last_time)},
                                    self.env_step)
                last_time, last_step = now, self.env_step
            timers["eval"] += t1 - t0
            timers["checkpoint"] += t2 - t1
            timers["log"] += time.perf_counter() - t2
        self.steady_end = self._time_mark()
        if self.eval_env is not None and self.last_eval_step < self.env_step:
            self.evaluate()
        self.save()
        if self.export_dataset:
            self._export()
        self.logger.scalars("time", timers, self.env_step)
        self.logger.close()
        self.env.close()
        if self.eval_env is not None:
            self.eval_env.close()


def _run_episodes(env, agent, use_planner: bool):
    """One episode in each of the env's E envs: their returns, lengths and the episodes."""
    E = env.spec.num_envs
    td = env.reset()
    builder = EpisodeBuilder(E)
    for i in range(E):
        builder.start(i, td[OBS][i], td[EPISODE][i], env.spec.action_dim)
    obs, is_first = td[OBS], torch.ones(E, dtype=torch.bool)
    returns, lengths = np.zeros(E), np.zeros(E, dtype=int)
    running = np.ones(E, dtype=bool)
    episodes: list[TensorDict] = []
    while running.any():
        action = agent.act(obs, is_first, eval_mode=True, use_planner=use_planner)
        td = env.step(action)
        returns[running] += td[REWARD].numpy()[running]
        lengths[running] += 1
        for i in np.flatnonzero(running):
            builder.append(i, td[OBS][i], action[i], td[REWARD][i], td[TERMINATED][i],
                           td[EPISODE][i])
            if td[DONE][i]:
                episodes.append(builder.finish(i))
        running &= ~td[DONE].numpy()
        obs, is_first = td[NEXT_OBS], td[DONE].clone()
    return returns.tolist(), lengths.tolist(), episodes
