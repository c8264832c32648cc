"""Data contracts shared by every component.

Shape conventions (time-major, as in SPEC.md and the official TD-MPC2):

- Env step TensorDicts have `batch_size=[E]` (E parallel envs).
- Replay samples have `batch_size=[T+1, B]` and follow the *arrival* convention: row t
  holds `obs_t` together with the action and reward that led to it. An episode's first
  stored row has NaN action and reward; a sample's row 0 action/reward are never read,
  and losses slice `[1:]`.
- Latents `[T+1, B, L]`, Q logits `[Q, T, B, K]`, planner candidates `[H, E, N, A]`,
  planner warm-start mean `[E, H, A]`.
- Dimension order: time, batch/env, samples, features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from tensordict import TensorDict

# ---------------------------------------------------------------------------
# TensorDict keys.
# ---------------------------------------------------------------------------
OBS = "obs"  # [E, *obs_shape] float32 (uint8 for pixels)
ACTION = "action"  # [E, A] float32 in [-1, 1]
REWARD = "reward"  # [E] float32, summed over the action repeat
TERMINATED = "terminated"  # [E] bool: a true terminal state (no bootstrapping)
TRUNCATED = "truncated"  # [E] bool: a time limit (bootstrapping continues)
DONE = "done"  # [E] bool: terminated | truncated
EPISODE = "episode"  # [E] int64, globally unique id of the episode the row belongs to
NEXT_OBS = "next_obs"  # [E, *obs_shape]: obs to act from next (a new episode's first obs where done)
NEXT_EPISODE = "next_episode"  # [E] int64: episode id of NEXT_OBS
IS_FIRST = "is_first"  # [E] bool: the observation starts an episode


@dataclass(frozen=True)
class EnvSpec:
    """What the runner learns from the environment and hands to components.

    Attributes:
        obs_shape: shape of one observation (after flattening for state tasks).
        action_dim: number of action dimensions; actions live in [-1, 1].
        episode_length: maximum episode length in *agent* steps (env steps / action_repeat).
        action_repeat: env steps per agent step.
        num_envs: E, the number of parallel environments.
        task: the task name (TD-MPC2 naming, e.g. `dog-run`).
        episodic: True when episodes can end by termination (not only by time limit).
        obs_type: `state` or `pixels`.
    """

    obs_shape: tuple[int, ...]
    action_dim: int
    episode_length: int
    action_repeat: int = 1
    num_envs: int = 1
    task: str = ""
    episodic: bool = False
    obs_type: str = "state"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Protocols, one per kind (checked by tests/rlcore/test_registry.py).
# ---------------------------------------------------------------------------
@runtime_checkable
class VecEnv(Protocol):
    """E environments stepped together.

    `reset()` returns a TensorDict[E] with OBS and EPISODE. `step(action [E, A])` returns a
    TensorDict[E] with OBS (what the action led to; the final obs where an episode ended),
    REWARD, TERMINATED, TRUNCATED, DONE, EPISODE, and NEXT_OBS / NEXT_EPISODE: where DONE,
    the env was already reset and NEXT_OBS is the new episode's first observation.
    """

    spec: EnvSpec

    def reset(self) -> TensorDict: ...

    def step(self, action: torch.Tensor) -> TensorDict: ...

    def close(self) -> None: ...


@runtime_checkable
class Planner(Protocol):
    """Plans one action per env from latents: `plan(z [E, L], is_first [E]) -> [E, A]`."""

    def plan(
        self, z: torch.Tensor, is_first: torch.Tensor, *, eval_mode: bool = False
    ) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ReplayBuffer(Protocol):
    """Stores whole episodes; samples `[T+1, B]` slices that never cross episodes."""

    def add(self, episode: TensorDict) -> None: ...

    def sample(self, batch_size: int | None = None) -> TensorDict: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Loss(Protocol):
    """Returns a TensorDict of weighted scalar `loss_*` terms plus `stats/*` diagnostics."""

    def __call__(self, *args: Any, **kwargs: Any) -> TensorDict: ...


@runtime_checkable
class Agent(Protocol):
    """Acts from observations and updates from replay batches."""

    def act(self, obs: torch.Tensor, is_first: torch.Tensor, *, eval_mode: bool = False,
            use_planner: bool = True) -> torch.Tensor: ...

    def update(self, batch: TensorDict) -> TensorDict: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
