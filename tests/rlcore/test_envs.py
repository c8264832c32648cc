"""Tests for rlcore.envs: DMC task names, observation layout, action repeat, resets, ids."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from rlcore.envs import GymnasiumVecEnv
from rlcore.registry import registered
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
    VecEnv,
)

STEP_KEYS = {ACTION, OBS, REWARD, TERMINATED, TRUNCATED, DONE, EPISODE, NEXT_OBS, NEXT_EPISODE}


@pytest.fixture
def envpool():
    return pytest.importorskip("envpool")


@pytest.fixture
def suite():
    with warnings.catch_warnings():  # glfw warns that there is no display; we never render
        warnings.simplefilter("ignore")
        pytest.importorskip("dm_control")
        from dm_control import suite

    return suite


def _actions(n: int, num_envs: int, action_dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(num_envs, action_dim, generator=g) * 2 - 1 for _ in range(n)]


# ---------------------------------------------------------------------------
# A tiny custom env for the gymnasium path.
# ---------------------------------------------------------------------------
class _Line(gym.Env):
    """x += action[0] each env step, reward 1; terminates once x >= 1 (or w.p. p_end)."""

    def __init__(self, low=(-0.4,), high=(0.4,), p_end: float = 0.0):
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float64)  # (x, t)
        self.action_space = spaces.Box(
            np.asarray(low, np.float32), np.asarray(high, np.float32), dtype=np.float32
        )
        self.p_end = p_end
        self.num_steps = 0
        self.last_action = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = 0.0, 0
        return self._obs(), {}

    def step(self, action):
        self.num_steps += 1
        self.last_action = np.array(action)
        self.x += float(action[0])
        self.t += 1
        terminated = self.x >= 1.0 or self.np_random.random() < self.p_end
        return self._obs(), 1.0, terminated, False, {}

    def _obs(self):
        return np.array([self.x, self.t], np.float64)


class _DictLine(_Line):
    """_Line with a Dict observation (keys given out of order on purpose)."""

    def __init__(self):
        super().__init__()
        self.observation_space = spaces.Dict(
            {"t": spaces.Box(0, np.inf, (1,)), "pos": spaces.Box(-np.inf, np.inf, (2,))}
        )

    def _obs(self):
        return {"t": np.array([self.t]), "pos": np.array([self.x, -self.x])}


# ---------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------
def test_envs_are_registered():
    envs = registered("envs")
    assert "EnvpoolVecEnv" in envs and "GymnasiumVecEnv" in envs


# ---------------------------------------------------------------------------
# DMC task names (envpool).
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, env_id",
    [
        ("dog-run", "DogRun-v1"),
        ("cup-catch", "BallInCupCatch-v1"),
        ("ball_in_cup-catch", "BallInCupCatch-v1"),
        ("point-mass-easy", "PointMassEasy-v1"),
        ("point_mass-easy", "PointMassEasy-v1"),
        ("pointmass-easy", "PointMassEasy-v1"),
        ("finger-turn-easy", "FingerTurnEasy-v1"),
        ("cartpole-swingup", "CartpoleSwingup-v1"),
        ("manipulator-bring-ball", "ManipulatorBringBall-v1"),
        ("humanoid_CMU-run", "HumanoidCMURun-v1"),
        ("DogRun-v1", "DogRun-v1"),
    ],
)
def test_resolve_task(envpool, task, env_id):
    from rlcore.envs import resolve_task

    assert resolve_task(task) == env_id


def test_every_task_name_resolves_and_covers_dm_control(envpool, suite):
    from rlcore.envs import dmc_task_names, resolve_task

    names = dmc_task_names()
    ids = {resolve_task(n) for n in names}
    assert len(ids) == 51
    # Every dm_control suite task has a name here (dm_control's names, kebab-case).
    for domain, task in suite.ALL_TASKS:
        assert f"{domain}-{task}".lower().replace("_", "-") in names


def test_unknown_task_suggests_names(envpool):
    from rlcore.envs import EnvpoolVecEnv, resolve_task

    with pytest.raises(ValueError) as info:
        resolve_task("dog-rn")
    msg = str(info.value)
    assert "'dog-rn'" in msg and "dog-run" in msg and "GymnasiumVecEnv" in msg
    with pytest.raises(ValueError, match="cup-catch"):
        EnvpoolVecEnv("cup-cach")


# ---------------------------------------------------------------------------
# Observation layout (envpool vs dm_control).
# ---------------------------------------------------------------------------
def test_obs_layout_matches_dm_control_for_every_task(envpool, suite):
    from rlcore.envs import dmc_obs_layout

    for domain, task in suite.ALL_TASKS:
        spec = suite.load(domain, task).observation_spec()
        expected = tuple((k, int(np.prod(v.shape))) for k, v in spec.items())
        assert dmc_obs_layout(f"{domain}-{task}") == expected, (domain, task)


def test_cartpole_obs_layout_matches_dm_control_values(envpool, suite):
    from rlcore.envs import EnvpoolVecEnv

    with EnvpoolVecEnv("cartpole-swingup", num_envs=1, seed=0) as env:
        env.reset()
        for a in _actions(5, 1, 1):
            td = env.step(a)
    obs = td[OBS][0].double().numpy()  # [position (3), velocity (2)]
    assert obs.shape == (5,)
    # Put dm_control's cartpole in the same state and flatten its observation dict.
    dm = suite.load("cartpole", "swingup")
    dm.reset()
    physics = dm.physics
    with physics.reset_context():
        physics.data.qpos[:] = [obs[0], np.arctan2(obs[2], obs[1])]
        physics.data.qvel[:] = obs[3:5]
    dm_obs = dm.task.get_observation(physics)
    flat = np.concatenate([np.ravel(v) for v in dm_obs.values()])
    np.testing.assert_allclose(flat, obs, atol=1e-5)


def test_dog_run_drops_fetch_keys(envpool):
    from rlcore.envs import EnvpoolVecEnv, dmc_obs_layout

    assert sum(n for _, n in dmc_obs_layout("dog-fetch")) == 232
    with EnvpoolVecEnv("dog-run", num_envs=1) as env:
        td = env.reset()
        assert env.spec.obs_shape == (223,) and env.spec.action_dim == 38
        assert td[OBS].shape == (1, 223)
        assert "ball_state" not in dict(env.obs_layout)
        assert env.step(torch.zeros(1, 38))[OBS].shape == (1, 223)


# ---------------------------------------------------------------------------
# Step contract, action repeat, truncation, ids, seeding (envpool).
# ---------------------------------------------------------------------------
def test_cartpole_step_contract(envpool):
    from rlcore.envs import EnvpoolVecEnv

    with EnvpoolVecEnv("cartpole-swingup", num_envs=3, seed=1) as env:
        assert isinstance(env, VecEnv)
        spec = env.spec
        assert spec.obs_shape == (5,) and spec.action_dim == 1 and spec.num_envs == 3
        assert spec.episode_length == 500 and spec.action_repeat == 2
        assert spec.episodic is False and spec.task == "cartpole-swingup"
        td = env.reset()
        assert td.batch_size == torch.Size([3])
        assert td[OBS].dtype == torch.float32 and td[OBS].shape == (3, 5)
        assert td[IS_FIRST].all() and td[EPISODE].tolist() == [0, 1, 2]
        out = env.step(torch.tensor([[5.0], [-0.5], [0.0]]))
        assert set(out.keys()) == STEP_KEYS and out.batch_size == torch.Size([3])
        assert out[ACTION].tolist() == [[1.0], [-0.5], [0.0]]  # clipped to [-1, 1]
        assert out[OBS].dtype == torch.float32 and out[REWARD].dtype == torch.float32
        for key in (TERMINATED, TRUNCATED, DONE):
            assert out[key].dtype == torch.bool and out[key].shape == (3,)
        assert out[EPISODE].dtype == torch.int64
        assert not out[DONE].any()
        assert torch.equal(out[NEXT_OBS], out[OBS])
        assert torch.equal(out[NEXT_EPISODE], out[EPISODE])
        with pytest.raises(ValueError):
            env.step(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="action_repeat"):
        EnvpoolVecEnv("cartpole-swingup", action_repeat=0)


def test_rewards_summed_over_action_repeat(envpool):
    from rlcore.envs import EnvpoolVecEnv

    actions = _actions(20, 2, 6, seed=3)
    with (
        EnvpoolVecEnv("walker-walk", num_envs=2, seed=7, action_repeat=1) as env1,
        EnvpoolVecEnv("walker-walk", num_envs=2, seed=7, action_repeat=2) as env2,
    ):
        env1.reset()
        env2.reset()
        for a in actions:
            first, second = env1.step(a), env1.step(a)
            out2 = env2.step(a)
            r1 = first[REWARD].double() + second[REWARD].double()
            torch.testing.assert_close(out2[REWARD].double(), r1, atol=1e-6, rtol=0)
            assert torch.equal(out2[OBS], second[OBS])
        assert r1.abs().sum() > 0
        assert env1.elapsed_steps.tolist() == env2.elapsed_steps.tolist() == [40, 40]


def test_truncation_and_explicit_reset(envpool):
    from rlcore.envs import EnvpoolVecEnv

    with EnvpoolVecEnv("cartpole-swingup", num_envs=2, seed=0, action_repeat=2) as env:
        td = env.reset()
        first_ids = td[EPISODE]
        for t, a in enumerate(_actions(500, 2, 1), start=1):
            out = env.step(a)
            if t < 500:
                assert not out[DONE].any(), t
        # A DMC episode: 1000 env steps = 500 agent steps, ending in a time limit.
        assert out[TRUNCATED].all() and not out[TERMINATED].any() and out[DONE].all()
        assert torch.equal(out[EPISODE], first_ids)
        assert (out[NEXT_OBS] != out[OBS]).any(dim=1).all()
        new_ids = out[NEXT_EPISODE]
        assert len(set(new_ids.tolist()) | set(first_ids.tolist())) == 4
        # The step after the explicit reset is a real step (no auto-reset step).
        nxt = env.step(torch.ones(2, 1))
        assert env.elapsed_steps.tolist() == [2, 2]
        assert torch.equal(nxt[EPISODE], new_ids) and not nxt[DONE].any()
        for t, a in enumerate(_actions(499, 2, 1, seed=1), start=2):
            out = env.step(a)
            assert out[DONE].all() == (t == 500), t


def test_truncation_with_uneven_action_repeat(envpool):
    from rlcore.envs import EnvpoolVecEnv

    with EnvpoolVecEnv("pendulum-swingup", num_envs=1, action_repeat=3) as env:
        assert env.spec.episode_length == 334  # ceil(1000 / 3)
        env.reset()
        for t in range(1, 335):
            out = env.step(torch.zeros(1, 1))
            assert out[TRUNCATED].item() == (t == 334), t
        assert env.elapsed_steps.tolist() == [0]  # reset after the 1000th env step


def test_episode_ids_unique_and_resumable(envpool):
    from rlcore.envs import EnvpoolVecEnv

    with EnvpoolVecEnv("cartpole-balance", num_envs=3) as env:
        assert env.reset()[EPISODE].tolist() == [0, 1, 2]
        assert env.reset()[EPISODE].tolist() == [3, 4, 5]
        state = env.state_dict()
    with EnvpoolVecEnv("cartpole-balance", num_envs=3) as env:
        env.load_state_dict(state)
        with pytest.raises(RuntimeError):
            env.step(torch.zeros(3, 1))
        assert env.reset()[EPISODE].tolist() == [6, 7, 8]


def test_same_seed_same_observations(envpool):
    from rlcore.envs import EnvpoolVecEnv

    def rollout(seed):
        with EnvpoolVecEnv("cheetah-run", num_envs=2, seed=seed) as env:
            obs = [env.reset()[OBS]]
            obs += [env.step(a)[OBS] for a in _actions(10, 2, 6)]
        return torch.stack(obs)  # [T, E, D]

    a, b, c = rollout(5), rollout(5), rollout(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0, 0], a[0, 1])  # envs within a batch differ


# ---------------------------------------------------------------------------
# gymnasium path.
# ---------------------------------------------------------------------------
def test_gymnasium_pendulum_truncates():
    with GymnasiumVecEnv(
        "Pendulum-v1", num_envs=2, seed=0, action_repeat=2, episodic=False
    ) as env:
        spec = env.spec
        assert spec.obs_shape == (3,) and spec.action_dim == 1
        assert spec.episode_length == 100 and spec.episodic is False  # 200 env steps / 2
        td = env.reset()
        assert td[OBS].dtype == torch.float32 and td[OBS].shape == (2, 3)
        assert td[IS_FIRST].all()
        for t, a in enumerate(_actions(100, 2, 1), start=1):
            out = env.step(a)
            assert set(out.keys()) == STEP_KEYS
            assert bool(out[DONE].any()) == (t == 100), t
        assert out[TRUNCATED].all() and not out[TERMINATED].any()
        assert (out[NEXT_OBS] != out[OBS]).any(dim=1).all()
        assert out[NEXT_EPISODE].tolist() == [2, 3]
        assert env.step(torch.zeros(2, 1))[EPISODE].tolist() == [2, 3]
        assert env.elapsed_steps.tolist() == [2, 2]


def test_gymnasium_seeding_and_time_limit_override():
    def first_obs(seed):
        with GymnasiumVecEnv("Pendulum-v1", num_envs=2, seed=seed) as env:
            return env.reset()[OBS]

    assert torch.equal(first_obs(1), first_obs(1))
    assert not torch.equal(first_obs(1), first_obs(2))
    with GymnasiumVecEnv("Pendulum-v1", max_episode_steps=10) as env:
        assert env.spec.episode_length == 10
        env.reset()
        dones = [env.step(torch.zeros(1, 1))[TRUNCATED].item() for _ in range(10)]
        assert dones == [False] * 9 + [True]


def test_gymnasium_early_termination_within_action_repeat():
    with GymnasiumVecEnv(_Line, num_envs=1, action_repeat=2, max_episode_steps=50) as env:
        assert env.spec.task == "_Line" and env.spec.episode_length == 25
        env.reset()
        out = env.step(torch.ones(1, 1))  # x: 0.4, 0.8
        assert out[REWARD].item() == 2.0 and not out[DONE].any()
        out = env.step(torch.ones(1, 1))  # x: 1.2 after the first substep -> terminal
        assert out[TERMINATED].item() and not out[TRUNCATED].item()
        assert out[REWARD].item() == 1.0  # the second substep was not taken
        assert env.envs[0].num_steps == 3
        assert out[OBS][0, 0].item() == pytest.approx(1.2, abs=1e-6)
        assert out[NEXT_OBS][0].tolist() == [0.0, 0.0]  # the new episode's first obs
        assert out[NEXT_EPISODE].item() == 1 and out[EPISODE].item() == 0


def test_gymnasium_action_rescaling_and_clipping():
    def factory():
        return _Line(low=(0.0, -3.0), high=(10.0, 3.0))

    with GymnasiumVecEnv(factory, num_envs=3, max_episode_steps=5) as env:
        env.reset()
        out = env.step(torch.tensor([[-1.0, 1.0], [0.0, 0.0], [5.0, -5.0]]))
        got = [e.last_action.tolist() for e in env.envs]
        assert got == [[0.0, 3.0], [5.0, 0.0], [10.0, -3.0]]
        assert out[ACTION][2].tolist() == [1.0, -1.0]


def test_gymnasium_dict_obs_flattened_in_key_order():
    with GymnasiumVecEnv(_DictLine, max_episode_steps=5) as env:
        assert env.spec.obs_shape == (3,)
        env.reset()
        out = env.step(torch.ones(1, 1))  # x = 0.4, t = 1; Dict space sorts keys: pos, t
        torch.testing.assert_close(out[OBS][0], torch.tensor([0.4, -0.4, 1.0]))


def test_gymnasium_episode_ids_unique():
    with GymnasiumVecEnv(
        lambda: _Line(p_end=0.3), num_envs=4, seed=0, max_episode_steps=100
    ) as env:
        current = env.reset()[EPISODE].tolist()
        seen = set(current)
        num_done = 0
        for a in _actions(40, 4, 1):
            out = env.step(a)
            assert out[EPISODE].tolist() == current
            for i in out[DONE].nonzero().flatten().tolist():
                new = out[NEXT_EPISODE][i].item()
                assert new not in seen
                seen.add(new)
                num_done += 1
            current = out[NEXT_EPISODE].tolist()
        assert num_done > 4 and seen == set(range(4 + num_done))


def test_gymnasium_errors():
    with pytest.raises(ValueError, match=r"'Pendulm-v1'.*Pendulum-v1.*gymnasium.register"):
        GymnasiumVecEnv("Pendulm-v1")
    with pytest.raises(ValueError, match="max_episode_steps"):
        GymnasiumVecEnv(_Line)
    with pytest.raises(ValueError, match="action_repeat"):
        GymnasiumVecEnv(_Line, max_episode_steps=5, action_repeat=0)
