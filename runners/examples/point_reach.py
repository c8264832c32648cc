"""PointReach: a user's own gymnasium env, trained through the runners unchanged.

A point in the plane must reach a goal. Observation: the point's position and the goal
(4 floats in [-1, 1]); action: a velocity in [-1, 1]^2 (moves at most `step_size` per
step); reward: minus the distance to the goal; the episode terminates at the goal (within
`goal_radius`) and is truncated after 200 steps. `render_mode='rgb_array'` draws the
point (blue) and the goal (green) on a white square.

Two ways to hand it to the framework, both without editing it (see gin/examples/):

- Registered id. Importing this module registers `PointReach-v0` with gymnasium; a gin
  file imports the module (`import runners.examples.point_reach`) and sets
  `TASK = 'PointReach-v0'` on top of gin/env/gymnasium.gin.
- Factory. `point_reach_factory` is registered with gin, so a gin file can bind
  `GymnasiumVecEnv.env = @point_reach_factory` (and set its arguments, e.g.
  `point_reach_factory.goal_radius = 0.2`) and the time limit
  (`GymnasiumVecEnv.max_episode_steps = 200`). GymnasiumVecEnv calls it with no
  arguments, or with `render_mode=...` when videos are recorded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gin
import gymnasium
import numpy as np

__all__ = ["ENV_ID", "PointReachEnv", "point_reach_factory"]

ENV_ID = "PointReach-v0"
MAX_EPISODE_STEPS = 200


class PointReachEnv(gymnasium.Env):
    """Move a point to a goal in [-1, 1]^2; terminates at the goal (episodic)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, render_mode: str | None = None, *, step_size: float = 0.1,
                 goal_radius: float = 0.1, frame_size: int = 128):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.step_size, self.goal_radius, self.frame_size = step_size, goal_radius, frame_size
        self.observation_space = gymnasium.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)

    def _obs(self) -> np.ndarray:
        return np.concatenate([self._pos, self._goal]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(-1.0, 1.0, 2)
        self._goal = self.np_random.uniform(-1.0, 1.0, 2)
        return self._obs(), {}

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        self._pos = np.clip(self._pos + self.step_size * a, -1.0, 1.0)
        dist = float(np.linalg.norm(self._goal - self._pos))
        terminated = dist <= self.goal_radius
        reward = 0.0 if terminated else -dist
        return self._obs(), reward, terminated, False, {"distance": dist}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        n = self.frame_size
        frame = np.full((n, n, 3), 255, np.uint8)
        ys, xs = np.mgrid[0:n, 0:n]

        def disc(center, radius, color):
            cx, cy = (center + 1.0) / 2.0 * (n - 1)  # [-1, 1] -> pixels; y up
            cy = n - 1 - cy
            frame[(xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2] = color

        disc(self._goal, max(2.0, self.goal_radius / 2.0 * n), (60, 180, 75))
        disc(self._pos, max(3.0, 0.05 * n), (30, 90, 220))
        return frame


@gin.register
def point_reach_factory(render_mode: str | None = None, *, step_size: float = 0.1,
                        goal_radius: float = 0.1) -> gymnasium.Env:
    """Build a PointReach env (for `GymnasiumVecEnv.env = @point_reach_factory`).

    A bare env has no registered time limit: bind `GymnasiumVecEnv.max_episode_steps`.
    """
    return PointReachEnv(render_mode, step_size=step_size, goal_radius=goal_radius)


if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point=PointReachEnv,
                       max_episode_steps=MAX_EPISODE_STEPS)
