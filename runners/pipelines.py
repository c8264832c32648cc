"""The online pipeline: envs -> agent -> replay -> updates, with evaluation.

`OnlineRunner` reads top to bottom like a CleanRL loop: collect with the agent over E
envs, seed with random actions, pretrain, then a fixed number of updates per env step,
evaluate, checkpoint. Helpers do the work; `run` shows the schedule. Every logged `step`
and checkpoint counts env steps (like ../shared/reference); the run directory's layout is
in runners/base.py.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable

import gin
import torch
from tensordict import TensorDict
from tqdm import tqdm

from rlcore import checks
from rlcore.types import DONE, EPISODE, NEXT_EPISODE, NEXT_OBS, OBS, REWARD, EnvSpec
from runners.base import RunnerBase
from runners.common import RunError
from runners.rollouts import EVAL_SEED_OFFSET, EpisodeBuilder, record_videos

_log = logging.getLogger("runners")

RESUME_SEED_STRIDE = 1_000_003  # a prime: resumed envs are seeded apart from all others


def train_env_seed(seed: int, env_step: int) -> int:
    """The training envs' seed: the run's seed for a fresh run; a resumed run's envs are
    seeded from the resume point, so every resume meets new start states."""
    return (seed + RESUME_SEED_STRIDE * env_step) % (2**31 - 2**16)


@gin.configurable
class OnlineRunner(RunnerBase):
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
        checkpoint_every: env steps between checkpoints (0: none but the one always
            written at the end, and at a stop signal).
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

    STEP_NAME, SOURCE, ENTRY = "env step", "env", "runners.online"
    COUNTERS = ("env_step", "agent_steps", "pretrained", "update_credit", "last_eval_step",
                "next_eval", "next_checkpoint")

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
        o = "OnlineRunner"
        seed = checks.integer(o, "seed", seed)
        total_env_steps = checks.integer(o, "total_env_steps", total_env_steps, at_least=1)
        if seed_steps is not None:
            seed_steps = checks.integer(o, "seed_steps", seed_steps, at_least=0)
        if pretrain_updates is not None:
            pretrain_updates = checks.integer(o, "pretrain_updates", pretrain_updates,
                                              at_least=0)
        utd_ratio = checks.number(o, "utd_ratio", utd_ratio, low=0)
        policy_updates = checks.number(o, "policy_updates", policy_updates, low=0)
        actor_critic_updates = checks.number(o, "actor_critic_updates", actor_critic_updates,
                                             low=0)
        eval_every = checks.integer(o, "eval_every", eval_every, at_least=0)
        eval_episodes = checks.integer(o, "eval_episodes", eval_episodes, at_least=0)
        if eval_every > 0 and eval_episodes < 1:
            raise ValueError(f"OnlineRunner.eval_episodes must be >= 1 while evaluation is on "
                             f"(OnlineRunner.eval_every = {eval_every}), got {eval_episodes}; "
                             "fix the binding OnlineRunner.eval_episodes, or set "
                             "OnlineRunner.eval_every = 0 to turn evaluation off")
        checkpoint_every = checks.integer(o, "checkpoint_every", checkpoint_every, at_least=0)
        keep_checkpoints = checks.integer(o, "keep_checkpoints", keep_checkpoints, at_least=1)
        log_every = checks.integer(o, "log_every", log_every, at_least=1)
        if num_threads is not None:
            num_threads = checks.integer(o, "num_threads", num_threads, at_least=1)
        validation_batches = checks.integer(o, "validation_batches", validation_batches,
                                            at_least=0)
        validation_capacity = checks.integer(o, "validation_capacity", validation_capacity,
                                             at_least=1)
        eval_videos = checks.integer(o, "eval_videos", eval_videos, at_least=0)
        video_size = checks.integer(o, "video_size", video_size, at_least=1)
        self.schedule = {"full": utd_ratio, "actor_critic": actor_critic_updates,
                         "policy": policy_updates}
        super().__init__(run_dir, seed, device, num_threads, progress, log_every,
                         validation_batches, eval_policy_prior)
        self.total_env_steps = total_env_steps
        self.eval_videos, self.video_size = eval_videos, video_size
        self.export_dataset = export_dataset
        self.eval_every, self.eval_episodes = eval_every, eval_episodes
        self.checkpoint_every = checkpoint_every
        # Build everything before anything is written, so a bad config fails cleanly.
        self.env = env(seed=seed)
        self.spec: EnvSpec = self.env.spec
        self.env_factory = env  # builds more envs of this task: env_factory(num_envs=, seed=)
        self.agent = agent(self.spec, self.device)
        self.replay = replay(self.spec, seed=seed, device=self.device)
        self.seed_steps = seed_steps if seed_steps is not None else max(
            1000, 5 * self.spec.episode_length)
        self.pretrain_updates = self.seed_steps if pretrain_updates is None else pretrain_updates
        self.eval_env = env(num_envs=eval_episodes, seed=seed + EVAL_SEED_OFFSET) \
            if eval_every or eval_episodes else None
        self._replay_factory = replay
        self.validation = {
            "validation_all": replay(self.spec, seed=seed + 1, device=self.device,
                                     capacity=validation_capacity),
            "validation_recent": None,
        } if validation_batches else {}
        self._open_run_dir(keep_checkpoints)
        # Counters (env steps include the action repeat and are summed over envs).
        self.env_step = 0
        self.agent_steps = 0
        self.pretrained = False
        self.update_credit = {name: 0.0 for name in self.schedule}
        self.last_eval_step = -1
        self.next_eval = eval_every or math.inf
        self.next_checkpoint = checkpoint_every or math.inf
        # Wall time per part of the loop (seconds), and marks around the steady phase.
        self.timers = {k: 0.0 for k in ("env", "plan", "update", "replay", "log", "eval",
                                        "checkpoint")}
        self.steady_start: dict[str, Any] | None = None
        self.steady_end: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return self.env_step

    def _position(self) -> str:
        return f"env step {self.env_step} ({self.num_updates} updates)"

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

    # -- checkpoints ------------------------------------------------------------------
    def _data_state(self) -> dict[str, Any]:
        return {"replay": self.replay.state_dict(),
                "env": self.env.state_dict() if hasattr(self.env, "state_dict") else {},
                "validation": {k: b.state_dict() for k, b in self.validation.items()
                               if b is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        env_step = int(state["counters"].get("env_step", 0))
        if env_step > 0:  # new start states: not those the run began with
            self.env.close()
            self.env = self.env_factory(seed=train_env_seed(self.seed, env_step))
        super().load_state_dict(state)

    def _load_data_state(self, state: dict[str, Any]) -> None:
        self.replay.load_state_dict(state["replay"])
        if state.get("env") and hasattr(self.env, "load_state_dict"):
            self.env.load_state_dict(state["env"])
        for name, buf_state in state.get("validation", {}).items():
            if self.validation.get(name) is None:
                self.validation[name] = self._new_validation_buffer()
            self.validation[name].load_state_dict(buf_state)

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
            builder.append(i, td, action)
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
            return {"pretrain": self.pretrain_updates}
        due = {}
        for name, count in self.schedule.items():
            self.update_credit[name] += self.spec.num_envs * count
            due[name] = int(self.update_credit[name])
            self.update_credit[name] -= due[name]
        return due

    def _update(self, due: dict[str, int], timers: dict[str, float]) -> None:
        if due.get("pretrain"):  # one long block (minutes on big models): its own bar
            n = due.pop("pretrain")
            with tqdm(total=n, desc="pretraining", unit="update", leave=False,
                      file=sys.stderr, dynamic_ncols=True,
                      disable=None if self.progress else True) as bar:
                self._run_updates({"full": n}, timers, bar.update)
        self._run_updates(due, timers)

    def _run_updates(self, due: dict[str, int], timers: dict[str, float],
                     tick: Callable[[], Any] | None = None) -> None:
        for pathway, n in due.items():
            for _ in range(n):
                if tick is not None:
                    tick()
                t0 = time.perf_counter()
                batch = self.replay.sample()
                t1 = time.perf_counter()
                metrics = self.agent.update(batch, pathway)
                self._note_update(metrics)
                t2 = time.perf_counter()
                if self.num_updates % self.log_every == 0:
                    self._log_update(metrics)
                timers["replay"] += t1 - t0
                timers["update"] += t2 - t1
                timers["log"] += time.perf_counter() - t2

    def _log_update(self, metrics: TensorDict) -> None:
        super()._log_update(metrics)
        self.logger.scalars("train", {"num_updates": self.num_updates}, self.env_step)
        if self.agent.planner.last_stats:
            self.logger.scalars("plan", self.agent.planner.last_stats, self.env_step)

    def _new_validation_buffer(self):
        return self._replay_factory(self.spec, seed=self.seed + 2, device=self.device,
                                    capacity=self.validation["validation_all"].capacity)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """E_eval episodes with the deterministic planner (and the policy prior alone);
        their planner episodes feed the validation buffers."""
        results, episodes = self._evaluate_in(self.eval_env)
        self.last_eval_step = self.env_step
        if self.validation:
            self._store_validation(episodes)
            self.validate()
        if self.eval_videos:
            record_videos(self.env_factory, self.env, self.agent, self.run_dir, self.env_step,
                          episodes=self.eval_videos, size=self.video_size,
                          seed=self.seed + EVAL_SEED_OFFSET, tb_writer=self.logger.writer)
        return results

    def _store_validation(self, episodes: list[TensorDict]) -> None:
        """Evaluation episodes go to the `all` buffer and replace the `recent` one."""
        self.validation["validation_recent"] = self._new_validation_buffer()
        for ep in episodes:
            self.validation["validation_all"].add(ep)
            self.validation["validation_recent"].add(ep)

    def validate(self) -> dict[str, dict[str, float]]:
        """Every loss on each held-out buffer, without gradients or training-state changes."""
        return {name: self._validation_pass(name, buf) for name, buf in self.validation.items()
                if buf is not None and buf.num_valid_starts > 0}

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
        if not self._begin(self.total_env_steps):  # finished: nothing to do
            self.env.close()
            if self.eval_env is not None:
                self.eval_env.close()
            return
        timers = self.timers
        builder = EpisodeBuilder(self.spec.num_envs)
        td = self.env.reset()
        for i in range(self.spec.num_envs):
            builder.start(i, td[OBS][i], td[EPISODE][i], self.spec.action_dim)
        obs, is_first = td[OBS], torch.ones(self.spec.num_envs, dtype=torch.bool)
        while self.env_step < self.total_env_steps:
            self.logger.phase("seeding" if self.agent_steps < self.seed_steps else "training")
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
            self._advance("env_steps_per_second", timers)
            self._check_stop()
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

