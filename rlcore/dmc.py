"""The dm_control suite in-process, with state or pixel observations and rendering.

`DMControlVecEnv` runs E `dm_control.suite` environments in a Python loop behind the
contract of `rlcore.envs` (`_VecEnvBase`: action repeat with summed rewards, explicit
per-env resets, episode ids, the step/reset TensorDicts). It exists for what envpool
cannot do here: rendering (envpool's renderer aborts the process on this machine), hence
pixel observations (TD-MPC2's `rgb` setting) and evaluation videos.

Task names follow TD-MPC2 as in `rlcore.envs.resolve_task`: `cartpole-swingup`,
`cup-catch` (ball_in_cup/catch), `point-mass-easy` or `pointmass-easy` (point_mass/easy),
`finger-turn-easy` (finger/turn_easy), `humanoid-cmu-run` (humanoid_CMU/run); an envpool
DMC id (`DogRun-v1`) is accepted too. See `dmc_suite_task_names()`.

Observations:

- `state`: dm_control's observation dict flattened to float32 [E, D] in dm_control's key
  order, the layout `rlcore.envs.dmc_obs_layout` gives `EnvpoolVecEnv` for the same task
  (`state_layout` holds ((key, size), ...)).
- `pixels`: uint8 [E, 3 * frame_stack, H, W], channels first, the last `frame_stack`
  RGB frames stacked oldest first (TD-MPC2's `PixelWrapper`: 64 x 64, 3 frames, camera 0,
  or 2 for quadruped). One frame is rendered per *agent* step, after the action repeat
  (or when the episode ends inside it); a reset fills the stack with the first frame.

Time limits. dm_control's own limit is switched off (`time_limit=inf`) and episodes are
truncated here after `max_episode_steps` env steps (default 1000, DMC's episode length):
TRUNCATED=True, TERMINATED=False, as envpool reports them. A task's own termination
(dm_control's `last()` step with the time limit off) is TERMINATED.

Seeding. Env i draws its initial states from `numpy.random.RandomState(seed + i)` (the
task's `random` argument); the same seed gives the same observations.

Rendering uses MuJoCo's offscreen OpenGL context; this module sets `MUJOCO_GL=egl` unless
the variable is already set (software EGL works here; `osmesa` or a GPU EGL elsewhere).
"""

from __future__ import annotations

import difflib
import functools
import os
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # before dm_control / mujoco are first imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from rlcore.envs import _DOMAIN_ALIASES, DMC_ACTION_REPEAT, _kebab, _VecEnvBase  # noqa: E402
from rlcore.registry import register  # noqa: E402
from rlcore.types import NEXT_OBS, OBS, EnvSpec  # noqa: E402

__all__ = ["DMC_TIME_LIMIT", "DMControlVecEnv", "dmc_suite_task_names", "resolve_suite_task"]

DMC_TIME_LIMIT = 1000  # env steps per DMC episode (TD-MPC2: 500 agent steps at repeat 2)

# TD-MPC2's cameras for pixel observations (envs/dmcontrol.py): quadruped uses camera 2.
_CAMERAS = {"quadruped": 2}


# ---------------------------------------------------------------------------
# Task names.
# ---------------------------------------------------------------------------
@functools.cache
def _suite_table() -> dict[str, tuple[str, str]]:
    """{kebab name or alias: (dm_control domain, task)} for every task of `suite.ALL_TASKS`.

    Names are `<domain>-<task>` with `_` -> `-`, lower case (`humanoid_CMU`, `run` ->
    `humanoid-cmu-run`), plus the TD-MPC2 domain aliases of `rlcore.envs` (`cup-catch`,
    `pointmass-easy`).
    """
    from dm_control import suite

    table: dict[str, tuple[str, str]] = {}
    for domain, task in suite.ALL_TASKS:
        d = _kebab(domain)
        table[f"{d}-{_kebab(task)}"] = (domain, task)
        for alias in _DOMAIN_ALIASES.get(d, ()):
            table[f"{alias}-{_kebab(task)}"] = (domain, task)
    return table


def dmc_suite_task_names() -> list[str]:
    """Every accepted dm_control task name (canonical names and TD-MPC2 aliases), sorted."""
    return sorted(_suite_table())


def resolve_suite_task(task: str) -> tuple[str, str]:
    """Map a TD-MPC2 task name (`cup-catch`, `point-mass-easy`) to dm_control's (domain, task).

    An envpool DMC id (`BallInCupCatch-v1`) is accepted too.

    Raises:
        ValueError: for an unknown task, naming the nearest valid names.
    """
    table = _suite_table()
    key = _kebab(task)
    if key in table:
        return table[key]
    if task.endswith(("-v0", "-v1")):  # an envpool id: its canonical kebab name
        try:
            from rlcore.envs import _canonical

            return table[_canonical(task)]
        except (ImportError, KeyError, ValueError):
            pass
    close = difflib.get_close_matches(key, list(table), n=5)
    hint = f"Nearest valid names: {', '.join(close)}." if close else "No close match."
    raise ValueError(
        f"unknown dm_control task {task!r}. {hint} Use one of the names from "
        f"rlcore.dmc.dmc_suite_task_names() (TD-MPC2 naming, e.g. 'cartpole-swingup', "
        f"'cup-catch'), or GymnasiumVecEnv for a task dm_control's suite lacks."
    )


# ---------------------------------------------------------------------------
# The env.
# ---------------------------------------------------------------------------
@register("envs")
class DMControlVecEnv(_VecEnvBase):
    """E dm_control suite envs stepped in-process: state or pixel observations, `render()`.

    Follows TD-MPC2 (Hansen et al., 2024, "TD-MPC2: Scalable, Robust World Models for
    Continuous Control", Appendix: action repeat 2 for DMC, rewards summed; 64 x 64 RGB
    observations, 3 stacked frames). The step/reset TensorDicts are those of
    `rlcore.envs` (see its module docstring), with pixel OBS / NEXT_OBS as uint8.

    Args:
        task: TD-MPC2 task name (`cartpole-swingup`, `cup-catch`; see
            `dmc_suite_task_names()`) or an envpool DMC id.
        num_envs: E, environments stepped together (in a Python loop).
        seed: env i draws its initial states from seed + i.
        action_repeat: env steps per agent step (default 2, TD-MPC2's DMC setting).
        obs_type: `state` (flattened float32 vector) or `pixels` (stacked uint8 frames).
        image_size: side of the rendered pixel observation (at least 39 for ConvEncoder).
        frame_stack: frames per pixel observation.
        camera_id: MuJoCo camera for pixel observations and `render()` (None: 0, or 2
            for quadruped, as TD-MPC2).
        max_episode_steps: time limit in env steps (None: 1000, DMC's episode length).

    Shapes: action [E, A] -> OBS [E, D] float32 (`state`) or [E, 3 * frame_stack, H, W]
    uint8 (`pixels`), REWARD [E]; `render(size)` -> [E, size, size, 3] uint8.
    """

    def __init__(
        self,
        task: str,
        *,
        num_envs: int = 1,
        seed: int = 0,
        action_repeat: int = DMC_ACTION_REPEAT,
        obs_type: str = "state",
        image_size: int = 64,
        frame_stack: int = 3,
        camera_id: int | None = None,
        max_episode_steps: int | None = None,
    ) -> None:
        from dm_control import suite

        if obs_type not in ("state", "pixels"):
            raise ValueError(f"obs_type must be 'state' or 'pixels', got {obs_type!r}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if image_size < 1 or frame_stack < 1:
            raise ValueError(f"image_size and frame_stack must be >= 1, got {image_size}, "
                             f"{frame_stack}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.domain, self.task_name = resolve_suite_task(task)
        self.obs_type = obs_type
        self.camera_id = _CAMERAS.get(self.domain, 0) if camera_id is None else int(camera_id)
        self.image_size, self.frame_stack = int(image_size), int(frame_stack)
        # dm_control's own time limit is off: truncation is counted here.
        self.envs = [
            suite.load(self.domain, self.task_name,
                       task_kwargs={"random": seed + i, "time_limit": float("inf")})
            for i in range(num_envs)
        ]
        first = self.envs[0]
        self.state_layout = tuple(
            (k, int(np.prod(v.shape))) for k, v in first.observation_spec().items()
        )  # ((key, size), ...) in dm_control's order
        action_spec = first.action_spec()
        time_limit = DMC_TIME_LIMIT if max_episode_steps is None else int(max_episode_steps)
        self._setup(
            num_envs=num_envs,
            action_repeat=int(action_repeat),
            time_limit=time_limit,
            low=action_spec.minimum,
            high=action_spec.maximum,
        )
        self.elapsed_steps = np.zeros(num_envs, np.int64)  # env steps into each episode
        self._act_shape = action_spec.shape
        if obs_type == "pixels":
            obs_shape: tuple[int, ...] = (3 * self.frame_stack, self.image_size, self.image_size)
            # [E, frame_stack, 3, H, W], oldest frame first
            self._frames = np.zeros((num_envs, self.frame_stack, 3, *obs_shape[1:]), np.uint8)
        else:
            obs_shape = (sum(n for _, n in self.state_layout),)
        self._substep_index = 0  # substeps taken in the current agent step
        self.spec = EnvSpec(
            obs_shape=obs_shape,
            action_dim=int(np.prod(action_spec.shape)),
            episode_length=self._episode_length,
            action_repeat=int(action_repeat),
            num_envs=num_envs,
            task=task,
            episodic=False,
            obs_type=obs_type,
        )

    # -- observations -----------------------------------------------------------------
    def _state(self, time_step: Any) -> np.ndarray:
        # {key: array} -> [D] float32 in dm_control's key order
        return np.concatenate(
            [np.asarray(v, np.float32).reshape(-1) for v in time_step.observation.values()]
        )

    def _frame(self, i: int, size: int) -> np.ndarray:
        """Env i's current camera image.  -> uint8 [size, size, 3]."""
        return self.envs[i].physics.render(height=size, width=size, camera_id=self.camera_id)

    def _push_frame(self, i: int, *, fill: bool = False) -> np.ndarray:
        """Render env i, append the frame to its stack (fill the stack on reset).

        -> uint8 [3 * frame_stack, H, W]
        """
        frame = self._frame(i, self.image_size).transpose(2, 0, 1)  # [3, H, W]
        if fill:
            self._frames[i] = frame
        else:
            self._frames[i, :-1] = self._frames[i, 1:]
            self._frames[i, -1] = frame
        return self._frames[i].reshape(self.spec.obs_shape)  # [3 * frame_stack, H, W]

    # -- backend hooks ----------------------------------------------------------------
    def _substep(self, env_ids, actions):
        k = env_ids.size
        obs = np.zeros((k, *self.spec.obs_shape), np.float32)
        reward = np.zeros(k, np.float64)
        term = np.zeros(k, bool)
        trunc = np.zeros(k, bool)
        last_substep = self._substep_index == self._action_repeat - 1
        self._substep_index += 1
        for j, i in enumerate(env_ids):
            ts = self.envs[i].step(actions[j].reshape(self._act_shape))
            self.elapsed_steps[i] += 1
            reward[j] = float(ts.reward or 0.0)
            term[j] = ts.last()  # a task's termination: dm_control's time limit is off
            trunc[j] = self.elapsed_steps[i] >= self._time_limit
            if self.obs_type == "state":
                obs[j] = self._state(ts)
            elif last_substep or term[j] or trunc[j]:
                # One frame per agent step: the one the agent acts from next. Rows of envs
                # that keep running are overwritten by a later substep.
                obs[j] = self._push_frame(i)
        return env_ids, obs, reward, term, trunc

    def _reset_envs(self, env_ids):
        obs = np.empty((env_ids.size, *self.spec.obs_shape), np.float32)
        for j, i in enumerate(env_ids):
            ts = self.envs[i].reset()
            self.elapsed_steps[i] = 0
            obs[j] = self._state(ts) if self.obs_type == "state" else self._push_frame(i, fill=True)
        return env_ids, obs

    # -- public API -------------------------------------------------------------------
    def reset(self) -> TensorDict:
        """Reset every env and start E new episodes (see `rlcore.envs`)."""
        return self._cast_obs(super().reset())

    def step(self, action: torch.Tensor) -> TensorDict:
        """Apply `action [E, A]` in [-1, 1] for `action_repeat` env steps (see `rlcore.envs`)."""
        self._substep_index = 0
        return self._cast_obs(super().step(action))

    def _cast_obs(self, td: TensorDict) -> TensorDict:
        # The shared stepping logic assembles float32 rows; pixels leave as uint8 (exact:
        # float32 holds 0..255 exactly).
        if self.obs_type == "pixels":
            for key in (OBS, NEXT_OBS):
                if key in td.keys():
                    td[key] = td[key].to(torch.uint8)
        return td

    def render(self, size: int = 256) -> np.ndarray:
        """Every env's current state seen from `camera_id`.  -> uint8 [E, size, size, 3].

        Where an episode just ended, `step()` has already reset the env, so the frame shows
        the new episode's start. Sizes beyond the model's offscreen buffer are rendered at
        the buffer's size and resized.
        """
        from rlcore.video import resize_frames

        frames = np.empty((self._num_envs, size, size, 3), np.uint8)
        for i, env in enumerate(self.envs):
            vis = env.physics.model.vis.global_
            side = min(size, int(vis.offwidth), int(vis.offheight))
            frames[i] = resize_frames(self._frame(i, side), size)
        return frames

    def close(self) -> None:
        """Free every env's physics and rendering context."""
        for env in self.envs:
            env.close()
            env.physics.free()
