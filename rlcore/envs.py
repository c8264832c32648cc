"""Vectorized environments that return TensorDicts and an `EnvSpec`.

Two backends share one contract (`rlcore.types.VecEnv`):

- `EnvpoolVecEnv`: the dm_control suite through envpool (C++, vectorized). Task names
  follow TD-MPC2 (`dog-run`, `cup-catch`, `finger-turn-easy`) and map to envpool ids
  (`DogRun-v1`, `BallInCupCatch-v1`, `FingerTurnEasy-v1`); see `dmc_task_names()`.
- `GymnasiumVecEnv`: E gymnasium envs stepped in-process, for tasks envpool lacks
  (TD-MPC2's custom tasks, any env a user registers or builds with a factory).

Step contract. `reset()` returns a TensorDict[E] with OBS, EPISODE and IS_FIRST (all
True). `step(action [E, A])` takes actions in [-1, 1] (clipped, then rescaled to the
env's bounds) and runs `action_repeat` env steps per agent step, summing rewards. An env
whose episode ends at substep k is not stepped again in that agent step. The returned
TensorDict[E] holds:

- ACTION [E, A] float32: the clipped action in [-1, 1].
- OBS [E, D] float32: what the action led to (the final observation where DONE).
- REWARD [E] float32: summed over the substeps actually taken.
- TERMINATED / TRUNCATED / DONE [E] bool: a true terminal state / a time limit /
  either. Where an env reports both, TERMINATED wins and TRUNCATED is False.
- EPISODE [E] int64: the globally unique id of the episode the transition belongs to.
- NEXT_OBS [E, D], NEXT_EPISODE [E]: where to act from next. Equal to OBS / EPISODE
  except where DONE: those envs were already reset, and NEXT_OBS is the first
  observation of the new episode NEXT_EPISODE.

Resets are explicit and per env, so envpool's auto-reset step (the step after done,
which ignores its action) never happens: the step after a reset is a real step.

Episode ids come from a counter (0, 1, 2, ... in reset order), unique across envs and
resets and deterministic. `state_dict()` holds the counter so that a resumed run keeps
ids unique; env physics are not saved, so a resumed run starts new episodes (call
`reset()` after `load_state_dict`).

Units. `EnvSpec.episode_length` is in *agent* steps: ceil(time limit in env steps /
action_repeat). A DMC episode is 1000 env steps = 500 agent steps at TD-MPC2's action
repeat of 2. envpool's own `frame_skip` is the physics substep count of a task (dog 3,
finger 2, fish 10), not an action repeat; it is left untouched.

DMC observations. envpool returns a dict of float64 arrays; we flatten it to float32
[E, D] in dm_control's own key order (`suite.load(d, t).observation_spec()`), so a
flattened observation has the same layout, key by key, as a flattened dm_control one and
the dimensions match the published TD-MPC2 settings. For several domains envpool returns
the union of the keys of all tasks of the domain, with zeros (or meaningless values) in
keys that the task does not have, and sometimes in another order. Measured with envpool
1.2.5 against dm_control; `_DMC_OBS_KEYS` keeps only dm_control's keys, in its order:

- dog (all but dog-fetch): drops the fetch-only `ball_state` and `target_position`
  (232 -> 223 dims, as dm_control). dog-fetch keeps them (232).
- quadruped walk/run: drops `origin`, `rangefinder`, `ball_state`, `target_position`
  (113 -> 78); escape keeps `origin`, `rangefinder` (101); fetch keeps the ball keys (90).
- humanoid stand/walk/run: drops `position` (95 -> 67); run_pure_state keeps only
  `position`, `velocity` (55).
- finger-spin: drops `target_position`, `dist_to_target` (12 -> 9).
- fish: dm_control puts `target` before `velocity` (swim, 24); upright drops `target` (21).

envpool's observation-space bounds are not meaningful and are ignored.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from typing import Any, Callable

import numpy as np
import torch
from tensordict import TensorDict

from rlcore import checks
from rlcore.registry import register
from rlcore.types import (
    ACTION,
    DONE,
    EPISODE,
    IS_FIRST,
    NEXT_EPISODE,
    NEXT_OBS,
    OBS,
    REWARD,
    TERMINATED,
    TRUNCATED,
    EnvSpec,
)

__all__ = [
    "DMC_ACTION_REPEAT",
    "EnvpoolVecEnv",
    "GymnasiumVecEnv",
    "dmc_obs_layout",
    "dmc_task_names",
    "resolve_task",
]

DMC_ACTION_REPEAT = 2  # TD-MPC2's action repeat for DMC (Hansen et al., 2024, Appendix)

# Bounds at least this wide count as unbounded (envpool's lqr uses +-1e10 for "no bound").
_UNBOUNDED = 1e6

# TD-MPC2 spells some dm_control domains differently ("cup-catch" is ball_in_cup-catch).
_DOMAIN_ALIASES = {"ball-in-cup": ("cup",), "point-mass": ("pointmass",)}

# dm_control's observation keys, in dm_control's order, keyed by task name or else by
# domain (checked against dm_control 1.0.x by tests/rlcore/test_envs.py).
_DOG_KEYS = (
    "joint_angles",
    "joint_velocites",  # sic: dm_control's spelling
    "torso_pelvis_height",
    "z_projection",
    "torso_com_velocity",
    "inertial_sensors",
    "foot_forces",
    "touch_sensors",
    "actuator_state",
)
_QUADRUPED_KEYS = ("egocentric_state", "torso_velocity", "torso_upright", "imu", "force_torque")
_HUMANOID_KEYS = (
    "joint_angles",
    "head_height",
    "extremities",
    "torso_vertical",
    "com_velocity",
    "velocity",
)
_DMC_OBS_KEYS: dict[str, tuple[str, ...]] = {
    "acrobot": ("orientations", "velocity"),
    "ball-in-cup": ("position", "velocity"),
    "cartpole": ("position", "velocity"),
    "cheetah": ("position", "velocity"),
    "dog": _DOG_KEYS,
    "dog-fetch": _DOG_KEYS + ("ball_state", "target_position"),
    "finger": ("position", "velocity", "touch", "target_position", "dist_to_target"),
    "finger-spin": ("position", "velocity", "touch"),
    "fish": ("joint_angles", "upright", "target", "velocity"),
    "fish-upright": ("joint_angles", "upright", "velocity"),
    "hopper": ("position", "velocity", "touch"),
    "humanoid": _HUMANOID_KEYS,
    "humanoid-run-pure-state": ("position", "velocity"),
    "humanoid-cmu": _HUMANOID_KEYS,
    "lqr": ("position", "velocity"),
    "manipulator": (
        "arm_pos",
        "arm_vel",
        "touch",
        "hand_pos",
        "object_pos",
        "object_vel",
        "target_pos",
    ),
    "pendulum": ("orientation", "velocity"),
    "point-mass": ("position", "velocity"),
    "quadruped": _QUADRUPED_KEYS,
    "quadruped-escape": _QUADRUPED_KEYS + ("origin", "rangefinder"),
    "quadruped-fetch": _QUADRUPED_KEYS + ("ball_state", "target_position"),
    "reacher": ("position", "to_target", "velocity"),
    "stacker": ("arm_pos", "arm_vel", "touch", "hand_pos", "box_pos", "box_vel", "target_pos"),
    "swimmer": ("joints", "to_target", "body_velocities"),
    "walker": ("orientations", "height", "velocity"),
}


# ---------------------------------------------------------------------------
# Task names.
# ---------------------------------------------------------------------------
def _kebab(name: str) -> str:
    """`point_mass-Easy` -> `point-mass-easy`: lower case, `_` -> `-`."""
    return name.strip().lower().replace("_", "-")


@functools.cache
def _dmc_table() -> tuple[dict[str, str], dict[str, str]]:
    """({kebab name or alias: envpool id}, {canonical kebab name: domain}).

    Built from envpool's registry: every id registered by `envpool.mujoco.dmc`, named
    `<domain>-<task>` after dm_control's (domain, task) with `_` -> `-` (`FingerTurnEasy-v1`
    -> `finger-turn-easy`, `HumanoidCMURun-v1` -> `humanoid-cmu-run`), plus TD-MPC2's
    aliases (`cup-catch`, `pointmass-easy`).
    """
    import envpool
    from envpool.registration import registry

    names: dict[str, str] = {}
    domains: dict[str, str] = {}
    for env_id in envpool.list_all_envs():
        import_path, spec_cls, kwargs = registry.specs[env_id]
        match = re.fullmatch(r"Dmc(\w+)EnvSpec", spec_cls)
        if import_path != "envpool.mujoco.dmc" or match is None:
            continue
        # BallInCup -> ball-in-cup, HumanoidCMU -> humanoid-cmu
        domain = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", match.group(1)).lower()
        task = _kebab(kwargs["task_name"])
        names[f"{domain}-{task}"] = env_id
        domains[f"{domain}-{task}"] = domain
        for alias in _DOMAIN_ALIASES.get(domain, ()):
            names[f"{alias}-{task}"] = env_id
    return names, domains


def dmc_task_names() -> list[str]:
    """Every accepted DMC task name (canonical names and TD-MPC2 aliases), sorted."""
    return sorted(_dmc_table()[0])


def resolve_task(task: str) -> str:
    """Map a TD-MPC2 task name (`dog-run`, `cup-catch`, `point_mass-easy`) to an envpool id.

    An envpool DMC id (`DogRun-v1`) is accepted as is.

    Raises:
        ValueError: for an unknown task, naming the nearest valid names and the fix.
    """
    names = _dmc_table()[0]
    if task in names.values():
        return task
    key = _kebab(task)
    if key in names:
        return names[key]
    close = difflib.get_close_matches(key, list(names), n=5)
    hint = f"Nearest valid names: {', '.join(close)}." if close else "No close match."
    raise ValueError(
        f"unknown DMC task {task!r}. {hint} Use one of the names from "
        f"rlcore.envs.dmc_task_names() (TD-MPC2 naming, e.g. 'dog-run', 'cup-catch'), or, "
        f"for a task envpool lacks (a custom or registered gymnasium env), use "
        f"GymnasiumVecEnv instead of EnvpoolVecEnv."
    )


def _canonical(task: str) -> str:
    """The canonical kebab name of a task (`cup-catch` -> `ball-in-cup-catch`)."""
    env_id = resolve_task(task)
    names, domains = _dmc_table()
    return next(n for n in domains if names[n] == env_id)


def dmc_obs_layout(task: str) -> tuple[tuple[str, int], ...]:
    """The flattened observation layout of a DMC task: ((key, size), ...) in order.

    dm_control's keys in dm_control's order (see the module docstring); a domain missing
    from `_DMC_OBS_KEYS` (a newer envpool) falls back to envpool's key order.
    """
    import envpool

    name = _canonical(task)
    space = envpool.make_spec(resolve_task(task)).observation_space
    domain = _dmc_table()[1][name]
    keys = _DMC_OBS_KEYS.get(name, _DMC_OBS_KEYS.get(domain, tuple(space.keys())))
    missing = [k for k in keys if k not in space.keys()]
    if missing:
        raise RuntimeError(f"envpool's {task!r} lacks observation keys {missing}")
    return tuple((k, int(np.prod(space[k].shape))) for k in keys)


# ---------------------------------------------------------------------------
# Shared stepping logic.
# ---------------------------------------------------------------------------
class _VecEnvBase:
    """Action repeat, explicit per-env resets, episode ids and TensorDict assembly.

    A backend implements `_substep(env_ids, actions)` (one env step for a subset of envs)
    and `_reset_envs(env_ids)`, both returning rows in the order of the ids they report.
    """

    spec: EnvSpec

    def _setup(
        self,
        *,
        num_envs: int,
        action_repeat: int,
        time_limit: int,
        low: np.ndarray,
        high: np.ndarray,
    ) -> None:
        num_envs = checks.integer(type(self).__name__, "num_envs", num_envs, at_least=1)
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        self._num_envs = num_envs
        self._action_repeat = action_repeat
        self._time_limit = time_limit  # env steps
        self._episode_length = math.ceil(time_limit / action_repeat)  # agent steps
        # Rescale [-1, 1] -> [low, high] only on dimensions with a finite, sane bound.
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        bounded = np.isfinite(low) & np.isfinite(high) & (high - low < _UNBOUNDED)
        self._low = np.where(bounded, low, -1.0)
        self._high = np.where(bounded, high, 1.0)
        self._next_episode_id = 0
        self._episode: np.ndarray | None = None  # [E] int64, set by reset()

    # -- backend hooks ------------------------------------------------------------
    def _substep(
        self, env_ids: np.ndarray, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One env step of `env_ids` -> (ids [k], obs [k, D], reward [k], term [k], trunc [k])."""
        raise NotImplementedError

    def _reset_envs(self, env_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reset `env_ids` -> (ids [k], first obs [k, D] float32)."""
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------
    def reset(self) -> TensorDict:
        """Reset every env and start E new episodes.

        Shapes: OBS [E, D] float32, EPISODE [E] int64, IS_FIRST [E] bool.
        """
        E = self._num_envs
        obs = np.empty((E, *self.spec.obs_shape), np.float32)
        ids, first = self._reset_envs(np.arange(E))
        obs[ids] = first
        self._episode = self._new_episode_ids(E)
        return TensorDict(
            {
                OBS: torch.from_numpy(obs),
                EPISODE: torch.from_numpy(self._episode.copy()),
                IS_FIRST: torch.ones(E, dtype=torch.bool),
            },
            batch_size=[E],
        )

    def step(self, action: torch.Tensor) -> TensorDict:
        """Apply `action [E, A]` in [-1, 1] for `action_repeat` env steps.

        Returns the TensorDict[E] described in the module docstring.
        """
        if self._episode is None:
            raise RuntimeError("call reset() before step()")
        E, A = self._num_envs, self.spec.action_dim
        if tuple(action.shape) != (E, A):
            raise ValueError(f"expected an action of shape {(E, A)}, got {tuple(action.shape)}")
        clipped = action.detach().to("cpu", torch.float64).numpy().clip(-1.0, 1.0)  # [E, A]
        if not np.isfinite(clipped).all():
            raise ValueError("action contains NaN")
        scaled = self._low + (clipped + 1.0) * 0.5 * (self._high - self._low)  # [E, A]

        # Action repeat: step only the envs whose episode is still running.
        obs = np.empty((E, *self.spec.obs_shape), np.float32)
        reward = np.zeros(E, np.float64)
        terminated = np.zeros(E, bool)
        truncated = np.zeros(E, bool)
        running = np.arange(E)
        for _ in range(self._action_repeat):
            ids, o, r, term, trunc = self._substep(running, scaled[running])
            obs[ids] = o
            reward[ids] += r
            terminated[ids] = term
            truncated[ids] = trunc & ~term
            running = ids[~(term | trunc)]
            if running.size == 0:
                break
        done = terminated | truncated

        # Explicit resets of the finished envs: NEXT_OBS starts their new episode.
        episode = self._episode.copy()
        next_obs = obs.copy()
        if done.any():
            ids, first = self._reset_envs(np.flatnonzero(done))
            next_obs[ids] = first
            self._episode[ids] = self._new_episode_ids(ids.size)
        return TensorDict(
            {
                ACTION: torch.from_numpy(clipped.astype(np.float32)),
                OBS: torch.from_numpy(obs),
                REWARD: torch.from_numpy(reward.astype(np.float32)),
                TERMINATED: torch.from_numpy(terminated),
                TRUNCATED: torch.from_numpy(truncated),
                DONE: torch.from_numpy(done),
                EPISODE: torch.from_numpy(episode),
                NEXT_OBS: torch.from_numpy(next_obs),
                NEXT_EPISODE: torch.from_numpy(self._episode.copy()),
            },
            batch_size=[E],
        )

    def state_dict(self) -> dict[str, Any]:
        """The episode-id counter (env physics are not saved; resume starts new episodes)."""
        return {"next_episode_id": int(self._next_episode_id)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the episode-id counter; call `reset()` afterwards."""
        self._next_episode_id = int(state["next_episode_id"])
        self._episode = None

    def close(self) -> None:
        """Release the underlying environments."""

    def __enter__(self) -> _VecEnvBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_episode_ids(self, n: int) -> np.ndarray:
        ids = np.arange(self._next_episode_id, self._next_episode_id + n, dtype=np.int64)
        self._next_episode_id += n
        return ids


# ---------------------------------------------------------------------------
# envpool backend (dm_control suite).
# ---------------------------------------------------------------------------
@register("envs")
class EnvpoolVecEnv(_VecEnvBase):
    """The dm_control suite through envpool, with TD-MPC2's task names and action repeat.

    Follows TD-MPC2 (Hansen et al., 2024, "TD-MPC2: Scalable, Robust World Models for
    Continuous Control", Appendix: action repeat 2 for DMC, rewards summed). envpool runs in
    sync mode (batch_size = num_envs); partial steps and resets address envs by id.

    Args:
        task: TD-MPC2 task name (`dog-run`, `cup-catch`; see `dmc_task_names()`) or an
            envpool DMC id (`DogRun-v1`).
        num_envs: E, environments stepped together.
        seed: envpool's seed; env i draws from seed + i. Same seed, same observations.
        action_repeat: env steps per agent step (default `DMC_ACTION_REPEAT` = 2).
        max_episode_steps: time limit in env steps (None: the task's own, 1000 for DMC);
            shorter limits make quick tests and smoke runs.

    Shapes: action [E, A] -> OBS [E, D] float32 (layout in `obs_layout`), REWARD [E].
    """

    def __init__(
        self,
        task: str,
        *,
        num_envs: int = 1,
        seed: int = 0,
        action_repeat: int | None = None,
        max_episode_steps: int | None = None,
    ) -> None:
        import envpool

        action_repeat = DMC_ACTION_REPEAT if action_repeat is None else int(action_repeat)
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        num_envs = checks.integer(type(self).__name__, "num_envs", num_envs, at_least=1)
        self.env_id = resolve_task(task)
        self.obs_layout = dmc_obs_layout(task)  # ((key, size), ...)
        self._keys = tuple(k for k, _ in self.obs_layout)
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        limit = {} if max_episode_steps is None else {"max_episode_steps": int(max_episode_steps)}
        self._env = envpool.make_gymnasium(
            self.env_id, num_envs=num_envs, batch_size=num_envs, seed=seed, **limit
        )
        time_limit = int(self._env.config["max_episode_steps"])  # env steps
        space = self._env.action_space
        self._setup(
            num_envs=num_envs,
            action_repeat=action_repeat,
            time_limit=time_limit,
            low=space.low,
            high=space.high,
        )
        self.elapsed_steps = np.zeros(num_envs, np.int64)  # env steps into each episode
        self.spec = EnvSpec(
            obs_shape=(sum(n for _, n in self.obs_layout),),
            action_dim=int(np.prod(space.shape)),
            episode_length=self._episode_length,
            action_repeat=action_repeat,
            num_envs=num_envs,
            task=task,
            episodic=False,
            obs_type="state",
        )

    def _flatten(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        # {key: [k, *shape]} float64 -> [k, D] float32 in `obs_layout` order
        n = len(obs[self._keys[0]])
        return np.concatenate([obs[k].reshape(n, -1) for k in self._keys], axis=1).astype(
            np.float32
        )

    def _substep(self, env_ids, actions):
        obs, reward, term, trunc, info = self._env.step(actions, env_id=env_ids.astype(np.int32))
        ids = info["env_id"].astype(np.int64)
        self.elapsed_steps[ids] = info["elapsed_step"]
        return ids, self._flatten(obs), reward, term.astype(bool), trunc.astype(bool)

    def _reset_envs(self, env_ids):
        obs, info = self._env.reset(env_ids.astype(np.int32))
        ids = info["env_id"].astype(np.int64)
        self.elapsed_steps[ids] = info["elapsed_step"]
        return ids, self._flatten(obs)

    def close(self) -> None:
        """Close the envpool."""
        self._env.close()


# ---------------------------------------------------------------------------
# gymnasium backend (custom and user-registered envs).
# ---------------------------------------------------------------------------
def _flat_size(space: Any) -> int:
    return int(np.prod(space.shape))


@register("envs")
class GymnasiumVecEnv(_VecEnvBase):
    """E gymnasium envs stepped in-process, behind the same contract as `EnvpoolVecEnv`.

    For TD-MPC2's custom tasks and any env a user registers with `gymnasium.register` or
    builds with a factory, without editing the framework. Each env is reset by hand when
    its episode ends (no gymnasium autoreset). Box observations are flattened to float32;
    a Dict of Boxes is flattened in the Dict space's key order. Box actions are rescaled
    from [-1, 1] to the action space's bounds (unbounded dimensions pass through).

    Args:
        env: a registered gymnasium id, or a zero-argument callable returning an env.
        num_envs: E, environments stepped together.
        seed: env i is reset with seed + i on its first reset.
        action_repeat: env steps per agent step.
        max_episode_steps: time limit in env steps; defaults to the env spec's
            `max_episode_steps`. Episodes are truncated at this limit (the env's own
            TimeLimit, if any, still applies).
        episodic: whether episodes can end by termination (copied to `EnvSpec.episodic`).
        render_mode: passed to `gymnasium.make` (or to a factory that accepts it); use
            `'rgb_array'` to record videos with `render()`.

    Shapes: action [E, A] -> OBS [E, D] float32, REWARD [E].
    """

    def __init__(
        self,
        env: str | Callable[[], Any],
        *,
        num_envs: int = 1,
        seed: int = 0,
        action_repeat: int = 1,
        max_episode_steps: int | None = None,
        episodic: bool = True,
        render_mode: str | None = None,
    ) -> None:
        import gymnasium

        num_envs = checks.integer(type(self).__name__, "num_envs", num_envs, at_least=1)
        if isinstance(env, str):
            task = env
            kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
            if render_mode is not None:
                kwargs["render_mode"] = render_mode
            factory = functools.partial(_make_registered, env, **kwargs)
        elif callable(env):
            task = getattr(env, "__name__", type(env).__name__)
            factory = env
            if render_mode is not None and _accepts(env, "render_mode"):
                factory = functools.partial(env, render_mode=render_mode)
        else:
            raise TypeError(f"env must be a gymnasium id or a zero-argument callable, got {env!r}")
        self.envs = [factory() for _ in range(num_envs)]
        first = self.envs[0]

        # Spaces: Box (or Dict of Boxes) observations, Box actions.
        obs_space, act_space = first.observation_space, first.action_space
        if not isinstance(act_space, gymnasium.spaces.Box):
            raise ValueError(f"{task!r}: only Box action spaces are supported, got {act_space}")
        if isinstance(obs_space, gymnasium.spaces.Dict):
            self._keys: tuple[str, ...] | None = tuple(obs_space.spaces)
            spaces = [obs_space.spaces[k] for k in self._keys]
        else:
            self._keys = None
            spaces = [obs_space]
        if not all(isinstance(s, gymnasium.spaces.Box) for s in spaces):
            raise ValueError(f"{task!r}: observations must be a Box or a Dict of Boxes")

        # Time limit in env steps.
        spec_limit = getattr(getattr(first, "spec", None), "max_episode_steps", None)
        time_limit = max_episode_steps if max_episode_steps is not None else spec_limit
        if time_limit is None:
            raise ValueError(
                f"{task!r} has no known time limit: pass max_episode_steps=<env steps> to "
                f"GymnasiumVecEnv, or register the env with max_episode_steps."
            )
        self._setup(
            num_envs=num_envs,
            action_repeat=int(action_repeat),
            time_limit=int(time_limit),
            low=act_space.low,
            high=act_space.high,
        )
        self._seed = seed
        self._seeded = False
        self.elapsed_steps = np.zeros(num_envs, np.int64)  # env steps into each episode
        self.spec = EnvSpec(
            obs_shape=(sum(_flat_size(s) for s in spaces),),
            action_dim=_flat_size(act_space),
            episode_length=self._episode_length,
            action_repeat=int(action_repeat),
            num_envs=num_envs,
            task=task,
            episodic=episodic,
            obs_type="state",
        )
        self._act_shape = act_space.shape
        self._act_dtype = act_space.dtype

    def _flatten(self, obs: Any) -> np.ndarray:
        # Box [*shape] or {key: Box} -> [D] float32
        if self._keys is None:
            return np.asarray(obs, np.float32).reshape(-1)
        return np.concatenate([np.asarray(obs[k], np.float32).reshape(-1) for k in self._keys])

    def _substep(self, env_ids, actions):
        k = env_ids.size
        obs = np.empty((k, *self.spec.obs_shape), np.float32)
        reward = np.zeros(k, np.float64)
        term = np.zeros(k, bool)
        trunc = np.zeros(k, bool)
        for j, i in enumerate(env_ids):
            a = actions[j].reshape(self._act_shape).astype(self._act_dtype)
            o, r, te, tr, _ = self.envs[i].step(a)
            self.elapsed_steps[i] += 1
            obs[j], reward[j], term[j] = self._flatten(o), float(r), bool(te)
            trunc[j] = bool(tr) or self.elapsed_steps[i] >= self._time_limit
        return env_ids, obs, reward, term, trunc

    def _reset_envs(self, env_ids):
        obs = np.empty((env_ids.size, *self.spec.obs_shape), np.float32)
        for j, i in enumerate(env_ids):
            seed = None if self._seeded else self._seed + int(i)
            o, _ = self.envs[i].reset(seed=seed)
            obs[j] = self._flatten(o)
            self.elapsed_steps[i] = 0
        self._seeded = True
        return env_ids, obs

    def render(self, size: int = 256) -> np.ndarray:
        """The current frame of every env, resized to size x size.  -> uint8 [E, size, size, 3].

        Needs envs created with `render_mode='rgb_array'`. Where an episode just ended,
        `step()` has already reset the env, so the frame shows the new episode's start.
        """
        from rlcore.video import resize_frames

        frames = np.empty((self._num_envs, size, size, 3), np.uint8)
        for i, env in enumerate(self.envs):
            frame = env.render()
            if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[-1] < 3:
                raise RuntimeError(
                    f"{self.spec.task!r}: render() returned {type(frame).__name__}, not an RGB "
                    f"array; create GymnasiumVecEnv with render_mode='rgb_array' (a factory "
                    f"must accept a render_mode argument or build its env with it)"
                )
            frames[i] = resize_frames(np.ascontiguousarray(frame[..., :3], np.uint8), size)
        return frames

    def close(self) -> None:
        """Close every env."""
        for env in self.envs:
            env.close()


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (or **kwargs)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _make_registered(env_id: str, **kwargs: Any) -> Any:
    """`gymnasium.make(env_id)`, with a ValueError that names the id and the fix."""
    import gymnasium

    try:
        return gymnasium.make(env_id, **kwargs)
    except gymnasium.error.Error as err:
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=5)
        hint = f" Nearest registered ids: {', '.join(close)}." if close else ""
        raise ValueError(
            f"unknown gymnasium env id {env_id!r} ({err}).{hint} Register it with "
            f"gymnasium.register(id=..., entry_point=..., max_episode_steps=...) in a module "
            f"that is imported (e.g. a gin `import` line), or pass a zero-argument factory "
            f"that builds the env."
        ) from err
