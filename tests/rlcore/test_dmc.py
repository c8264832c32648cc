"""rlcore.dmc.DMControlVecEnv: the VecEnv contract, state layout, pixels, rendering, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlcore import registry
from rlcore.dmc import DMControlVecEnv, dmc_suite_task_names, resolve_suite_task
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

TASK = "cartpole-swingup"


def _env(**kwargs):
    kwargs.setdefault("num_envs", 2)
    return DMControlVecEnv(TASK, **kwargs)


def _rollout(env, actions):
    """Step `env` through actions [T, E, A] after a reset -> the reset td and the step tds."""
    first = env.reset()
    return first, [env.step(a) for a in actions]


# ---------------------------------------------------------------------------
# Names and registration.
# ---------------------------------------------------------------------------
def test_task_names_follow_td_mpc2():
    assert resolve_suite_task("cup-catch") == ("ball_in_cup", "catch")
    assert resolve_suite_task("point-mass-easy") == ("point_mass", "easy")
    assert resolve_suite_task("pointmass-easy") == ("point_mass", "easy")
    assert resolve_suite_task("finger-turn-easy") == ("finger", "turn_easy")
    assert resolve_suite_task("humanoid-cmu-run") == ("humanoid_CMU", "run")
    assert resolve_suite_task("dog-run") == ("dog", "run")
    assert {"cartpole-swingup", "cup-catch", "dog-run"} <= set(dmc_suite_task_names())
    with pytest.raises(ValueError, match="cup-catch"):
        resolve_suite_task("cup-cath")


def test_registered_and_satisfies_the_protocol():
    assert registry.registered("envs")["DMControlVecEnv"] is DMControlVecEnv
    with _env(num_envs=1) as env:
        assert isinstance(env, VecEnv)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="obs_type"):
        _env(obs_type="rgb")
    with pytest.raises(ValueError, match="max_episode_steps"):
        _env(max_episode_steps=0)


# ---------------------------------------------------------------------------
# The step contract (state observations).
# ---------------------------------------------------------------------------
def test_reset_and_step_shapes_and_dtypes():
    with _env() as env:
        spec = env.spec
        assert spec.obs_shape == (5,) and spec.action_dim == 1 and spec.obs_type == "state"
        assert spec.episode_length == 500 and spec.action_repeat == 2 and not spec.episodic
        td = env.reset()
        assert td.batch_size == torch.Size([2])
        assert td[OBS].shape == (2, 5) and td[OBS].dtype == torch.float32
        assert td[EPISODE].tolist() == [0, 1] and td[IS_FIRST].all()
        td = env.step(torch.full((2, 1), 3.0))
        assert td[ACTION].tolist() == [[1.0], [1.0]]  # clipped to [-1, 1]
        for key, shape, dtype in [(OBS, (2, 5), torch.float32), (NEXT_OBS, (2, 5), torch.float32),
                                  (REWARD, (2,), torch.float32), (TERMINATED, (2,), torch.bool),
                                  (TRUNCATED, (2,), torch.bool), (DONE, (2,), torch.bool),
                                  (EPISODE, (2,), torch.int64), (NEXT_EPISODE, (2,), torch.int64)]:
            assert td[key].shape == shape and td[key].dtype == dtype, key
        assert torch.equal(td[OBS], td[NEXT_OBS]) and not td[DONE].any()


def test_truncation_at_the_time_limit_with_repeat_2():
    """10 env steps at repeat 2: the 5th agent step ends the episode (truncated, not
    terminated); NEXT_OBS is a fresh first observation of a new episode."""
    with _env(max_episode_steps=10) as env:
        assert env.spec.episode_length == 5
        _, tds = _rollout(env, torch.ones(5, 2, 1))
        assert not any(td[DONE].any() for td in tds[:4])
        last = tds[-1]
        assert last[TRUNCATED].all() and not last[TERMINATED].any() and last[DONE].all()
        assert last[EPISODE].tolist() == [0, 1] and last[NEXT_EPISODE].tolist() == [2, 3]
        assert (env.elapsed_steps == 0).all()
        # Swing-up starts hanging down at rest: cos(angle) ~ -1, small velocities.
        fresh = last[NEXT_OBS]
        assert torch.allclose(fresh[:, 1], torch.full((2,), -1.0), atol=1e-3)
        assert fresh[:, 3:].abs().max() < 0.1
        assert (last[OBS] - fresh).abs().max() > 0.05  # the final obs, not the new one
        td = env.step(torch.zeros(2, 1))  # the step after a reset is a real step
        assert td[EPISODE].tolist() == [2, 3] and not td[DONE].any()


def test_an_episode_ending_inside_the_repeat_is_not_stepped_again():
    with _env(num_envs=1, max_episode_steps=9) as env:
        assert env.spec.episode_length == 5
        _, tds = _rollout(env, torch.zeros(5, 1, 1))
        assert tds[-1][TRUNCATED].all() and not any(td[DONE].any() for td in tds[:4])


def test_rewards_are_summed_over_the_repeat():
    actions = torch.rand(6, 1, 1) * 2 - 1  # [T, E, A]
    with _env(num_envs=1, action_repeat=2, seed=5) as env2, \
            _env(num_envs=1, action_repeat=1, seed=5) as env1:
        _, tds2 = _rollout(env2, actions)
        _, tds1 = _rollout(env1, actions.repeat_interleave(2, dim=0))
    r1 = torch.stack([td[REWARD] for td in tds1]).view(6, 2)  # [T, repeat]
    r2 = torch.stack([td[REWARD] for td in tds2]).view(6)
    assert torch.allclose(r2, r1.sum(1), atol=1e-6) and (r2 > 0).all()
    assert torch.equal(tds2[-1][OBS], tds1[-1][OBS])


def test_state_layout_equals_envpools():
    envs = pytest.importorskip("rlcore.envs")
    pytest.importorskip("envpool")
    with _env(num_envs=1) as env, envs.EnvpoolVecEnv(TASK, num_envs=1) as ref:
        assert env.state_layout == envs.dmc_obs_layout(TASK) == ref.obs_layout
        assert env.spec.obs_shape == ref.spec.obs_shape
        # Same layout, value by value: both start hanging down at rest (noise 0.01).
        assert torch.allclose(env.reset()[OBS], ref.reset()[OBS], atol=0.1)


def test_seeding_is_deterministic():
    actions = torch.rand(3, 2, 1) * 2 - 1
    with _env(seed=3) as a, _env(seed=3) as b, _env(seed=4) as c:
        ra, ta = _rollout(a, actions)
        rb, tb = _rollout(b, actions)
        rc, _ = _rollout(c, actions)
    assert torch.equal(ra[OBS], rb[OBS]) and torch.equal(ta[-1][OBS], tb[-1][OBS])
    assert not torch.equal(ra[OBS][0], ra[OBS][1])  # env i draws from seed + i
    assert not torch.equal(ra[OBS], rc[OBS])


# ---------------------------------------------------------------------------
# Rendering and pixel observations.
# ---------------------------------------------------------------------------
def test_render_shape():
    with _env(num_envs=2) as env:
        env.reset()
        frames = env.render(96)
        assert frames.shape == (2, 96, 96, 3) and frames.dtype == np.uint8
        assert frames.std() > 1  # an image, not a blank buffer
        assert env.render(800).shape == (2, 800, 800, 3)  # beyond the offscreen buffer


@pytest.mark.parametrize("task,camera_id,expected",
                         [("quadruped-walk", None, 2), (TASK, None, 0), (TASK, 1, 1)])
def test_camera_follows_td_mpc2(task, camera_id, expected):
    with DMControlVecEnv(task, camera_id=camera_id) as env:
        assert env.camera_id == expected


def test_pixel_frame_stacking():
    with _env(num_envs=1, obs_type="pixels", max_episode_steps=4) as env:
        spec = env.spec
        assert spec.obs_type == "pixels" and spec.obs_shape == (9, 64, 64)
        td = env.reset()
        assert td[OBS].shape == (1, 9, 64, 64) and td[OBS].dtype == torch.uint8
        frames = td[OBS].view(3, 3, 64, 64)  # [stack, RGB, H, W]
        assert torch.equal(frames[0], frames[1]) and torch.equal(frames[1], frames[2])
        assert frames.float().std() > 1

        td = env.step(torch.ones(1, 1))
        assert td[OBS].dtype == torch.uint8 and td[NEXT_OBS].dtype == torch.uint8
        new = td[OBS].view(3, 3, 64, 64)
        assert torch.equal(new[:2], frames[1:])  # shifted by one frame
        assert not torch.equal(new[2], frames[2])  # the newest frame shows the move

        td = env.step(torch.ones(1, 1))  # env step 4: truncated
        assert td[TRUNCATED].all()
        final = td[OBS].view(3, 3, 64, 64)
        fresh = td[NEXT_OBS].view(3, 3, 64, 64)
        assert torch.equal(final[:2], new[1:])
        assert torch.equal(fresh[0], fresh[1]) and torch.equal(fresh[1], fresh[2])
        assert not torch.equal(fresh[2], final[2])
