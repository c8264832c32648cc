"""Evaluation of a trained run from its saved config alone, with returns and videos.

`Evaluator` rebuilds the env and the agent from the run's `config.gin` (the
`OnlineRunner.env` and `.agent` bindings, or `OfflineRunner`'s; nothing else of the
training run is built) with the EnvSpec the agent trained with (`run.json`), loads a
checkpoint's `agent` state, runs N episodes with the deterministic planner (and with the
policy prior alone), records videos, and writes:

    run_dir/
      eval.json                               returns (mean, std, per episode) and videos
      videos/eval_step<step>_ep<i>.mp4        H.264, video_size x video_size
      tb/events.out.tfevents.*                a new events file: the videos as GIFs

Nothing else in the run directory is touched; every file appears complete or not at all
(temporary name, then rename). Episodes and videos come from runners.rollouts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import gin
import numpy as np
import torch

from rlcore.checkpointing import SENTINEL, STATE_FILE, CheckpointError, Checkpointer
from rlcore.seeding import seed_everything
from rlcore.types import EnvSpec
from runners.common import ConfigError, RunError, select_device, write_atomic
from runners.rollouts import EVAL_SEED_OFFSET, record_videos, run_episodes

__all__ = ["EVAL_FILE", "Evaluator", "find_checkpoint"]

_log = logging.getLogger("runners")

EVAL_FILE = "eval.json"
TB_DIR = "tb"


def _runner_bindings() -> dict[str, Any]:
    """The bindings of the runner that trained the run (`OnlineRunner` or `OfflineRunner`)."""
    for root in ("OnlineRunner", "OfflineRunner"):
        try:
            run = gin.get_bindings(root)
        except (ValueError, KeyError):  # not registered: its module is not imported
            continue
        if run.get("env") is not None and run.get("agent") is not None:
            return run
    raise ConfigError("the config binds no OnlineRunner.env / .agent (nor OfflineRunner.env / "
                      ".agent): evaluate with the run's own config.gin, and bind an env "
                      "for a run trained offline without one (--gin_param='OfflineRunner.env "
                      "= @envs.EnvpoolVecEnv')")


def find_checkpoint(run_dir: str | os.PathLike[str],
                    checkpoint: str | os.PathLike[str] | None = None) -> tuple[Path, int]:
    """The checkpoint folder to evaluate and its env step.

    `checkpoint` (a `step_<n>` folder or its `state.pt`) or else the newest complete
    checkpoint in `run_dir/checkpoints`, verified against its sentinel.

    Raises:
        RunError: there is none, or it is incomplete or corrupt.
    """
    ckpts = Checkpointer(Path(run_dir) / "checkpoints")
    if checkpoint is None and ckpts.latest() is None:
        raise RunError(
            f"no complete checkpoint in {ckpts.directory} (a checkpoint is a step_<n> folder "
            f"with a {SENTINEL} file): nothing to evaluate. Train the run first "
            f"(python -m runners.online --run_dir={run_dir}), or pass "
            "--checkpoint=<run>/checkpoints/step_<n>.")
    try:
        folder = ckpts.verify(checkpoint)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    try:
        step = int(json.loads((folder / SENTINEL).read_text())["step"])
    except (OSError, ValueError, KeyError):
        step = int(folder.name.rsplit("_", 1)[-1])
    return folder, step


def _summary(returns: list[float], lengths: list[int]) -> dict[str, Any]:
    return {"mean": float(np.mean(returns)), "std": float(np.std(returns)),
            "returns": [float(r) for r in returns], "lengths": [int(n) for n in lengths]}


@gin.configurable
class Evaluator:
    """Rebuild a run's env and agent from its gin config, load a checkpoint, evaluate.

    The gin config must already be loaded (the run's `config.gin`, as
    `python -m runners.evaluate` does); only `OnlineRunner.env`, `.agent`, `.seed`,
    `.device` and `.num_threads` (or `OfflineRunner`'s) are read from it.

    Args:
        run_dir: the run directory: checkpoints are looked up in `run_dir/checkpoints`,
            and `eval.json`, `videos/` and TensorBoard events are written there.
        checkpoint: a `step_<n>` folder (or its `state.pt`); None takes the newest complete
            checkpoint of the run.
        episodes: N, episodes per mode, run in parallel (N envs).
        policy_prior: also evaluate the policy prior alone (no planning).
        videos: K, episodes recorded as videos with the planner (0: none).
        video_size: frame side in pixels (even).
        video_fps: frames per second of the mp4 files.
        seed: seed of the evaluation envs and of torch; None uses the run's seed + 100000
            (as the online runner's evaluations).
        device: `auto` (CUDA when present), `cpu`, ...; None uses the run's device.
        tensorboard: also log the videos to `run_dir/tb` (GIF image summaries).
    """

    def __init__(self, run_dir: str | os.PathLike[str], *,
                 checkpoint: str | os.PathLike[str] | None = None, episodes: int = 10,
                 policy_prior: bool = True, videos: int = 1, video_size: int = 256,
                 video_fps: float = 30.0, seed: int | None = None, device: str | None = "auto",
                 tensorboard: bool = True):
        if episodes < 1:
            raise RunError(f"episodes must be >= 1, got {episodes}")
        if videos < 0:
            raise RunError(f"videos must be >= 0, got {videos}")
        if videos and (video_size < 16 or video_size % 2):
            raise RunError(f"video_size must be an even number >= 16, got {video_size}")
        self.run_dir = Path(run_dir)
        self.episodes, self.policy_prior = episodes, policy_prior
        self.videos, self.video_size, self.video_fps = videos, video_size, video_fps
        self.tensorboard = tensorboard

        # The checkpoint first: without one there is nothing to evaluate.
        self.checkpoint, self.step = find_checkpoint(self.run_dir, checkpoint)

        # The run's env and agent references, from its gin config.
        run = _runner_bindings()
        self._env_factory, agent_factory = run["env"], run["agent"]
        if run.get("num_threads"):
            torch.set_num_threads(run["num_threads"])
        self.seed = seed if seed is not None else run.get("seed", 1) + EVAL_SEED_OFFSET
        self.device = select_device(device or run.get("device", "auto"))

        # Build the env and the agent, then load the checkpoint's agent state. The agent
        # gets the spec it trained with (run.json), so it is rebuilt exactly.
        seed_everything(self.seed)
        self.env = self._env_factory(num_envs=episodes, seed=self.seed)
        self.spec: EnvSpec = self.env.spec
        agent_spec = self._agent_spec()
        self.agent = agent_factory(agent_spec, self.device)
        self.agent.load_state_dict(self._load_agent_state())

    # -- inputs -------------------------------------------------------------------------
    def _agent_spec(self) -> EnvSpec:
        """The spec the run trained with (run.json), checked against the rebuilt env.

        Observations and actions must agree; another task or episode length (evaluating
        on a variant of the training task) is allowed with a warning.
        """
        meta = self.run_dir / "run.json"
        saved = json.loads(meta.read_text()).get("spec") if meta.exists() else None
        if not saved:
            return self.spec
        fields = {f.name for f in dataclasses.fields(EnvSpec)}
        saved = {k: v for k, v in saved.items() if k in fields}
        saved["obs_shape"] = tuple(saved.get("obs_shape", self.spec.obs_shape))
        saved["num_envs"] = self.spec.num_envs
        trained = dataclasses.replace(self.spec, **saved)
        now = self.spec.to_dict()
        diff = {k: (v, now[k]) for k, v in trained.to_dict().items() if v != now[k]}
        if {"obs_shape", "action_dim", "obs_type"} & set(diff):
            raise RunError(f"the env built from the config does not fit the trained agent "
                           f"(run.json): {diff}; evaluate with the run's own config.gin")
        if diff:
            _log.warning("evaluating on an env that differs from training (trained, now): %s",
                         diff)
        return trained

    def _load_agent_state(self) -> dict[str, Any]:
        try:  # mmap: the replay buffer in the same file is never read
            state = torch.load(self.checkpoint / STATE_FILE, map_location="cpu",
                               weights_only=True, mmap=True)
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise RunError(f"cannot read the checkpoint {self.checkpoint}: {e}") from None
        if "agent" not in state:
            raise RunError(f"the checkpoint {self.checkpoint} holds no agent state")
        return state["agent"]

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Evaluate, record videos, write `eval.json`; return its contents."""
        t0 = time.perf_counter()
        result: dict[str, Any] = {
            "step": self.step,
            "checkpoint": str(self.checkpoint),
            "task": self.spec.task,
            "seed": self.seed,
            "episodes": self.episodes,
        }
        modes = [("planner", True)] + ([("policy_prior", False)] if self.policy_prior else [])
        for name, use_planner in modes:
            returns, lengths, _ = run_episodes(
                self.env, self.agent, use_planner,
                progress=f"{name} ({self.episodes} episodes)")
            result[name] = _summary(returns, lengths)
            _log.info("%s: return %.1f +- %.1f over %d episodes", name, result[name]["mean"],
                      result[name]["std"], self.episodes)
        if not self.policy_prior:
            result["policy_prior"] = None
        self.env.close()
        result["videos"] = self._record() if self.videos else []
        result["seconds"] = round(time.perf_counter() - t0, 2)
        write_atomic(self.run_dir / EVAL_FILE, json.dumps(result, indent=2) + "\n")
        return result

    def _record(self) -> list[dict[str, Any]]:
        writer = None
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.run_dir / TB_DIR))  # a new events file
        try:
            videos = record_videos(self._env_factory, self.env, self.agent, self.run_dir,
                                   self.step, episodes=self.videos, size=self.video_size,
                                   fps=self.video_fps, seed=self.seed, tb_writer=writer)
        finally:
            if writer is not None:
                writer.close()
        for v in videos:
            _log.info("video %s: %d frames, return %.1f", v["path"], v["frames"], v["return"])
        return videos
