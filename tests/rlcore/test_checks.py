"""Constructor arguments of the wrong type or range fail where gin names the binding."""

from __future__ import annotations

import pytest

from rlcore import checks
from rlcore.types import EnvSpec


@pytest.mark.parametrize("value", ["sixteen", 1.5, True, None])
def test_integer_refuses_other_types(value):
    with pytest.raises(ValueError, match=r"Buffer.batch_size must be an integer >= 1, got "):
        checks.integer("Buffer", "batch_size", value, at_least=1)


def test_integer_bounds():
    assert checks.integer("A", "n", 3, at_least=1) == 3
    with pytest.raises(ValueError, match=r"A.n must be an integer >= 1, got 0; fix the binding A.n"):
        checks.integer("A", "n", 0, at_least=1)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "abc"])
def test_number_refuses_out_of_range_and_non_finite(value):
    with pytest.raises(ValueError, match=r"A.lr must be a finite number in \(0, inf\)"):
        checks.number("A", "lr", value, low=0.0, low_open=True)


def test_components_check_their_arguments():
    from components.planners.mppi import MPPIPlanner
    from components.replay.episodic import EpisodeSliceBuffer

    spec = EnvSpec(obs_shape=(3,), action_dim=1, episode_length=10, num_envs=1)
    with pytest.raises(ValueError, match="EpisodeSliceBuffer.batch_size must be an integer"):
        EpisodeSliceBuffer(spec, capacity=100, batch_size="sixteen")
    with pytest.raises(ValueError, match="MPPIPlanner.horizon must be an integer >= 1, got 0"):
        MPPIPlanner(None, 1, 0.99, horizon=0)
    with pytest.raises(ValueError, match="MPPIPlanner.min_std must be a finite number"):
        MPPIPlanner(None, 1, 0.99, min_std=0.0)


def test_envpool_num_envs_must_be_an_integer():
    from rlcore.envs import EnvpoolVecEnv

    with pytest.raises(ValueError, match="EnvpoolVecEnv.num_envs must be an integer >= 1, "
                                         "got 1.5"):
        EnvpoolVecEnv("cartpole-balance", num_envs=1.5)
