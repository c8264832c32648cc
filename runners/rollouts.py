"""Episodes of an agent in vectorized envs: training collection rows, evaluation, videos.

The online and offline runners evaluate with `run_episodes`, `runners.evaluate` scores a
checkpoint with it, and `record_videos` adds mp4 files and TensorBoard GIFs to either.

Videos come from a render-capable copy of the run's env (`video_env_for`): envpool cannot
render on this machine, so an `EnvpoolVecEnv` run records from `rlcore.dmc.DMControlVecEnv`
on the same task (same observation layout, different physics RNG: video episodes are
extra episodes, not replays of the scored ones); a `GymnasiumVecEnv` is rebuilt with
`render_mode='rgb_array'` (same seeds, so video episode i starts where scored episode i
did). A clip holds one frame per agent step, starting with the first observation; the
final frame of an episode is missing, because the env resets inside `step()`.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tensordict import TensorDict
from tqdm import tqdm

from rlcore.types import ACTION, DONE, EPISODE, NEXT_OBS, OBS, REWARD, TERMINATED, EnvSpec
from rlcore.video import Mp4Writer, add_video, resize_frames
from runners.common import RunError

EVAL_SEED_OFFSET = 100_000  # evaluation envs and noise use the run's seed + this
VIDEO_DIR = "videos"
VIDEO_TAG = "eval_video"

Sink = Callable[[int, np.ndarray], None]


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

    def append(self, i: int, td: TensorDict, action: torch.Tensor) -> None:
        """Env i's row of a step's output `td`."""
        self.rows[i].append({OBS: td[OBS][i], ACTION: action[i], REWARD: td[REWARD][i],
                             TERMINATED: td[TERMINATED][i], EPISODE: td[EPISODE][i]})

    def finish(self, i: int) -> TensorDict:
        rows = self.rows[i]
        return TensorDict({k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                          batch_size=[len(rows)])


@torch.no_grad()
def run_episodes(env: Any, agent: Any, use_planner: bool = True, *, sink: Sink | None = None,
                 size: int = 256, progress: str | None = None
                 ) -> tuple[list[float], list[int], list[TensorDict]]:
    """One episode in each of `env`'s E envs, acting in eval mode.

    With `progress` (a label), a transient progress bar over the episodes' agent steps is
    shown on stderr when it is a terminal.

    With `sink`, every agent step is rendered: `sink(i, frame)` receives env i's frames in
    order (uint8 [size, size, 3]), the first observation, then one per step until the
    episode ends, so an episode of L agent steps gives L frames.

    Returns:
        (returns, lengths) per env, and the episodes in the order they ended.
    """
    E = env.spec.num_envs
    td = env.reset()
    builder = EpisodeBuilder(E)
    for i in range(E):
        builder.start(i, td[OBS][i], td[EPISODE][i], env.spec.action_dim)
    running = np.ones(E, dtype=bool)
    if sink is not None:
        _render(env, sink, size, running)
    obs, is_first = td[OBS], torch.ones(E, dtype=torch.bool)
    returns, lengths = np.zeros(E), np.zeros(E, dtype=int)
    episodes: list[TensorDict] = []
    bar = tqdm(total=getattr(env.spec, "episode_length", None), desc=progress, unit="step",
               leave=False, file=sys.stderr, dynamic_ncols=True,
               disable=None if progress else True)
    while running.any():
        bar.update()
        action = agent.act(obs, is_first, eval_mode=True, use_planner=use_planner)  # [E, A]
        td = env.step(action)
        returns[running] += td[REWARD].numpy()[running]
        lengths[running] += 1
        for i in np.flatnonzero(running):
            builder.append(i, td, action)
            if td[DONE][i]:
                episodes.append(builder.finish(i))
        running &= ~td[DONE].numpy()
        if sink is not None and running.any():
            _render(env, sink, size, running)
        obs, is_first = td[NEXT_OBS], td[DONE].clone()
    bar.close()
    return returns.tolist(), lengths.tolist(), episodes


def _render(env: Any, sink: Sink, size: int, running: np.ndarray) -> None:
    frames = env.render(size)  # [E, size, size, 3]
    for i in np.flatnonzero(running):
        sink(int(i), frames[i])


def _takes_render_mode(env_factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(env_factory).parameters.values()
    except (TypeError, ValueError):  # a signature that cannot be read: assume it does not
        return False
    return any(p.name == "render_mode" or p.kind == p.VAR_KEYWORD for p in params)


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
        video_env = DMControlVecEnv(spec.task, num_envs=num_envs, seed=seed,
                                    action_repeat=spec.action_repeat, obs_type=spec.obs_type,
                                    max_episode_steps=spec.episode_length * spec.action_repeat)
    elif _takes_render_mode(env_factory):  # GymnasiumVecEnv and the like
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
    tb_side = size if tb_size is None else min(tb_size, size)
    clips: list[list[np.ndarray]] = [[] for _ in range(episodes)]

    def sink(i: int, frame: np.ndarray) -> None:
        if tb_writer is not None and writers[i].frames % tb_stride == 0:
            clips[i].append(resize_frames(frame, tb_side))
        writers[i].append(frame)

    try:
        returns, lengths, _ = run_episodes(video_env, agent, use_planner, sink=sink, size=size)
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
