"""components/accel.py: each drop-in part computes what the reference classes compute."""

from __future__ import annotations

import subprocess
import sys

import gin
import torch
import torch.nn as nn
import torch.nn.functional as F

from components.accel import OneExpMish, one_exp_mish
from rlcore.config import REPO_ROOT, load_gin
from rlcore.types import EnvSpec
from tests.components.test_agent import losses_of, make_batch

SPEC = EnvSpec(obs_shape=(5,), action_dim=2, episode_length=500, num_envs=3)


def test_one_exp_mish_is_mish_in_value_and_gradient():
    x = torch.cat([torch.linspace(-120.0, 120.0, 24001), torch.randn(10000) * 4])
    x64 = x.double().requires_grad_()
    F.mish(x64).sum().backward()
    xs = x.clone().requires_grad_()
    y = OneExpMish()(xs)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(xs.grad).all()
    # float32 Mish itself is this far from float64 Mish
    torch.testing.assert_close(y.double(), F.mish(x64).detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_every_mish_is_replaced_and_the_parameters_are_kept(tiny_agent_factory):
    reference = tiny_agent_factory(SPEC).model
    model = tiny_agent_factory(SPEC, model_transforms=[one_exp_mish]).model
    count = sum(type(m) is nn.Mish for m in reference.modules())
    assert count > 0
    assert sum(type(m) is nn.Mish for m in model.modules()) == 0
    assert sum(type(m) is OneExpMish for m in model.modules()) == count
    assert list(model.state_dict()) == list(reference.state_dict())


def test_agent_with_the_part_computes_the_reference(tiny_agent_factory):
    """Same seed: the same planner actions and the same losses, within float32 rounding."""
    obs = torch.randn(SPEC.num_envs, *SPEC.obs_shape)
    first = torch.ones(SPEC.num_envs, dtype=torch.bool)
    results = []
    for transforms in ((), (one_exp_mish,)):
        torch.manual_seed(3)
        agent = tiny_agent_factory(SPEC, model_transforms=transforms)
        actions = agent.act(obs, first)
        losses = [losses_of(agent.update(make_batch(seed=s))) for s in range(3)]
        results.append((actions, losses, agent.model.state_dict()))
    (a0, l0, s0), (a1, l1, s1) = results
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-5)
    for x, y in zip(l0, l1):
        assert x.keys() == y.keys()
        for k in x:
            assert abs(x[k] - y[k]) <= 1e-4 * max(1.0, abs(x[k])), (k, x[k], y[k])
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-4, atol=1e-5)


def test_the_preset_swaps_the_part_in_and_the_operative_config_records_it(tmp_path):
    gin_dir = REPO_ROOT / "gin"
    load_gin([str(gin_dir / "tdmpc2_dog.gin"), str(gin_dir / "presets" / "fast_mish.gin"),
              str(gin_dir / "test" / "tiny.gin")], finalize=False)
    from runners.pipelines import OnlineRunner

    runner = OnlineRunner(str(tmp_path / "run"))
    runner.env.close()
    if runner.eval_env is not None:
        runner.eval_env.close()
    kinds = {type(m) for m in runner.agent.model.modules()}
    assert OneExpMish in kinds and nn.Mish not in kinds
    assert "TDMPC2Agent.model_transforms = [@accel.one_exp_mish]" in gin.operative_config_str()


def test_the_preset_imports_what_it_binds():
    """In a fresh process (here the test module has registered the part already)."""
    code = ("from rlcore.config import load_gin; import gin; "
            "load_gin(['gin/tdmpc2_dog.gin', 'gin/presets/fast_mish.gin'], finalize=False); "
            "print(gin.query_parameter('TDMPC2Agent.model_transforms'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "one_exp_mish" in proc.stdout
