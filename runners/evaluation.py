"""Evaluation of a trained run from its saved config alone, with returns and videos.

`Evaluator` rebuilds the env and the agent from the run's `config.gin` (the
`OnlineRunner.env` and `.agent` bindings, or `OfflineRunner`'s; nothing else of the
training run is built) with the EnvSpec the agent trained with (`run.json`), loads a checkpoint's `agent` state, runs N episodes with the deterministic planner
(and with the policy prior alone), records videos, and writes:

    run_dir/
      eval.json                               returns (mean, std, per episode) and videos
      videos/eval_step<step>_ep<i>.mp4        H.264, video_size x video_size
      tb/events.out.tfevents.*                a new events file: the videos as GIFs

Nothing else in the run directory is touched; every file appears complete or not at all
(temporary name, then rename).

Videos come from a render-capable copy of the run's env (`video_env_for`): envpool cannot
render on this machine, so an `EnvpoolVecEnv` run records from `rlcore.dmc.DMControlVecEnv`
on the same task (same observation layout, different physics RNG: video episodes are
extra episodes, not replays of the scored ones); a `GymnasiumVecEnv` is rebuilt with
`render_mode='rgb_array'` (same seeds, so video episode i starts where scored episode i
did). A clip holds one frame per agent step, starting with the first observation; the
final frame of an episode is missing, because the env resets inside `step()`.

`record_videos` is the piece `OnlineRunner.evaluate` calls to add videos to its periodic
evaluations.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import gin
import numpy as np
import torch

from rlcore.checkpointing import SENTINEL, STATE_FILE, CheckpointError, Checkpointer
from rlcore.seeding import seed_everything
from rlcore.types import DONE, NEXT_OBS, OBS, REWARD, EnvSpec
from rlcore.video import Mp4Writer, add_video, resize_frames
from runners.common import ConfigError, RunError, select_device

__all__ = ["EVAL_FILE", "Evaluator", "find_checkpoint", "record_episodes", "record_videos",
           "video_env_for"]

_log = logging.getLogger("runners")

EVAL_FILE = "eval.json"
VIDEO_DIR = "videos"
TB_DIR = "tb"
VIDEO_TAG = "eval_video"
EVAL_SEED_OFFSET = 100_000  # as OnlineRunner's evaluation envs


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


# ---------------------------------------------------------------------------
# Video envs and recording.
# ---------------------------------------------------------------------------
def video_env_for(env_factory: Callable[..., Any], env: Any, *, num_envs: int, seed: int):
    """A render-capable env with the observations and actions of the run's `env`.

    Args:
        env_factory: the run's env reference (`OnlineRunner.env`), called with
            `num_envs`, `seed` (and `render_mode` where it takes one).
        env: an instance the factory built (decides which backend renders).

    Raises:
        RunError: the env cannot render, or the render-capable copy disagrees with it.
    """
    from rlcore.envs import EnvpoolVecEnv

    spec: EnvSpec = env.spec
    if isinstance(env, EnvpoolVecEnv):
        # envpool cannot render here: dm_control on the same task renders with MUJOCO_GL=egl.
        try:
            from rlcore.dmc import DMControlVecEnv
        except ImportError as e:
            raise RunError(f"videos of envpool task {spec.task!r} need rlcore.dmc "
                           f"(dm_control): {e}") from None
        kwargs: dict[str, Any] = {"num_envs": num_envs, "seed": seed,
                                  "action_repeat": spec.action_repeat}
        if _accepts(DMControlVecEnv, "max_episode_steps"):
            kwargs["max_episode_steps"] = spec.episode_length * spec.action_repeat
        if _accepts(DMControlVecEnv, "obs_type"):
            kwargs["obs_type"] = spec.obs_type
        video_env = DMControlVecEnv(spec.task, **kwargs)
    elif _accepts(env_factory, "render_mode"):  # GymnasiumVecEnv and the like
        video_env = env_factory(num_envs=num_envs, seed=seed, render_mode="rgb_array")
    elif callable(getattr(env, "render", None)):  # an env that always renders
        video_env = env_factory(num_envs=num_envs, seed=seed)
    else:
        raise RunError(f"{type(env).__name__} cannot render, so no videos can be recorded for "
                       f"{spec.task!r}; pass --videos=0 (Evaluator.videos = 0)")
    got = (video_env.spec.obs_shape, video_env.spec.action_dim)
    if got != (spec.obs_shape, spec.action_dim):
        video_env.close()
        raise RunError(f"the render-capable env for {spec.task!r} has observations/actions "
                       f"{got}, the run's env {(spec.obs_shape, spec.action_dim)}; pass "
                       "--videos=0")
    return video_env


@torch.no_grad()
def record_episodes(env: Any, agent: Any, sink: Callable[[int, np.ndarray], None], *,
                    size: int = 256, use_planner: bool = True) -> tuple[list[float], list[int]]:
    """One episode in each of `env`'s E envs, rendered every agent step.

    `sink(i, frame)` receives env i's frames in order (uint8 [size, size, 3]): the first
    observation, then one frame per step until the episode ends (the final frame is not
    available: finished envs are reset inside `step()`), so an episode of L agent steps
    gives L frames.

    Returns:
        (returns, lengths), one per env.
    """
    E = env.spec.num_envs
    td = env.reset()
    frames = env.render(size)  # [E, size, size, 3]
    for i in range(E):
        sink(i, frames[i])
    obs, is_first = td[OBS], torch.ones(E, dtype=torch.bool)
    returns, lengths = np.zeros(E), np.zeros(E, dtype=int)
    running = np.ones(E, dtype=bool)
    while running.any():
        action = agent.act(obs, is_first, eval_mode=True, use_planner=use_planner)  # [E, A]
        td = env.step(action)
        done = td[DONE].numpy()
        returns[running] += td[REWARD].numpy()[running]
        lengths[running] += 1
        running &= ~done
        if running.any():
            frames = env.render(size)  # [E, size, size, 3]
            for i in np.flatnonzero(running):
                sink(int(i), frames[i])
        obs, is_first = td[NEXT_OBS], td[DONE].clone()
    return returns.tolist(), lengths.tolist()


def record_videos(env_factory: Callable[..., Any], env: Any, agent: Any,
                  run_dir: str | os.PathLike[str], step: int, *, episodes: int = 1,
                  size: int = 256, fps: float = 30.0, seed: int = 0, use_planner: bool = True,
                  tb_writer: Any = None, tb_size: int | None = 128, tb_stride: int = 2,
                  prefix: str = "eval") -> list[dict[str, Any]]:
    """Record `episodes` episodes of `agent` as mp4 files (and TensorBoard GIFs).

    Files: `run_dir/videos/<prefix>_step<step>_ep<i>.mp4`; TensorBoard tag
    `eval_video/ep<i>` at `step` when `tb_writer` (a SummaryWriter) is given, shrunk to
    `tb_size` and every `tb_stride`-th frame (GIFs are large).

    Returns:
        One entry per episode: path (relative to run_dir), episode, return, length,
        frames, size [H, W].
    """
    if size < 16 or size % 2:
        raise RunError(f"video size must be an even number >= 16, got {size}")
    run_dir = Path(run_dir)
    video_env = video_env_for(env_factory, env, num_envs=episodes, seed=seed)
    paths = [run_dir / VIDEO_DIR / f"{prefix}_step{step}_ep{i}.mp4" for i in range(episodes)]
    writers = [Mp4Writer(p, fps=fps) for p in paths]
    # TensorBoard keeps only every tb_stride-th frame, shrunk: full clips would be big.
    tb_side = size if tb_size is None else min(tb_size, size)
    clips: list[list[np.ndarray]] = [[] for _ in range(episodes)]

    def sink(i: int, frame: np.ndarray) -> None:
        if tb_writer is not None and writers[i].frames % tb_stride == 0:
            clips[i].append(resize_frames(frame, tb_side))
        writers[i].append(frame)

    try:
        returns, lengths = record_episodes(video_env, agent, sink, size=size,
                                           use_planner=use_planner)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        video_env.close()
    out = []
    for i, w in enumerate(writers):
        w.close()
        if tb_writer is not None:
            add_video(tb_writer, f"{VIDEO_TAG}/ep{i}", np.stack(clips[i]), step,
                      fps=fps / tb_stride, size=None)
        out.append({"path": str(paths[i].relative_to(run_dir)), "episode": i,
                    "return": float(returns[i]), "length": int(lengths[i]),
                    "frames": w.frames, "size": [size, size]})
    if tb_writer is not None:
        tb_writer.flush()
    return out


# ---------------------------------------------------------------------------
# The evaluator.
# ---------------------------------------------------------------------------
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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp_{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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
        from runners.pipelines import _run_episodes  # lazy: pipelines may import this module

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
            returns, lengths, _ = _run_episodes(self.env, self.agent, use_planner)
            result[name] = _summary(returns, lengths)
            _log.info("%s: return %.1f +- %.1f over %d episodes", name, result[name]["mean"],
                      result[name]["std"], self.episodes)
        if not self.policy_prior:
            result["policy_prior"] = None
        self.env.close()
        result["videos"] = self._record() if self.videos else []
        result["seconds"] = round(time.perf_counter() - t0, 2)
        _write_json_atomic(self.run_dir / EVAL_FILE, result)
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
