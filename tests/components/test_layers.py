"""The building blocks compute the functions the paper names (App. A)."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from components import layers
from rlcore.types import EnvSpec
from tests.components.test_agent import make_batch

SPEC = EnvSpec(obs_shape=(5,), action_dim=2, episode_length=500, num_envs=3)


@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 512), (512,)])
def test_simnorm_is_a_softmax_over_groups_of_eight(shape):
    x = torch.randn(*shape) * 4
    y = layers.SimNorm(8)(x)
    groups = y.view(*shape[:-1], -1, 8)
    torch.testing.assert_close(groups.sum(-1), torch.ones(groups.shape[:-1]))
    torch.testing.assert_close(groups, F.softmax(x.view(*shape[:-1], -1, 8), dim=-1))


def test_normed_linear_is_linear_dropout_layernorm_mish():
    m = layers.NormedLinear(6, 4, dropout=0.1)
    assert [type(x) for x in m] == [nn.Linear, nn.Dropout, nn.LayerNorm, nn.Mish]
    m.eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), F.mish(F.layer_norm(m[0](x), (4,), m[2].weight, m[2].bias)))


@pytest.mark.parametrize("members", [None, [3, 1]])
def test_ensemble_matches_a_loop_over_member_mlps(members):
    """Each member is Linear -> LayerNorm -> Mish -> ... -> Linear with its own weights."""
    ens = layers.EnsembleMLP(4, 6, [8, 8], 3)
    with torch.no_grad():
        for p in ens.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 5, 6)
    idx = torch.tensor(members) if members is not None else None
    got = ens(x, idx)
    want = []
    for m in (members if members is not None else range(4)):
        h = x
        for i in range(3):
            h = h @ getattr(ens, f"w{i}")[m] + getattr(ens, f"b{i}")[m, 0]
            if i < 2:
                h = F.mish(F.layer_norm(h, (8,), getattr(ens, f"ln_w{i}")[m, 0],
                                        getattr(ens, f"ln_b{i}")[m, 0]))
        want.append(h)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_concat_mlp_with_one_latent_for_many_actions_is_the_concatenation():
    """Planning's first step: one latent per env, N candidate actions."""
    net = layers.mlp(4 + 2, [8, 8], 4, out_act=layers.SimNorm(2))
    z, a = torch.randn(3, 1, 4), torch.randn(3, 5, 2)
    want = net(torch.cat(layers.broadcast_pair(z, a), -1))
    torch.testing.assert_close(layers.concat_mlp(net, z, a), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers.concat_mlp(net, z.expand(3, 5, 4), a), want)


def _randomize_outputs(agent):
    """Zero-initialized output layers would hide differences; give them random weights."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in agent.model.parameters():
            if p.abs().sum() == 0 and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        agent.model.sync_copies()


def _run(agent, steps: int = 3):
    torch.manual_seed(7)
    obs = torch.randn(SPEC.num_envs, 5)
    out = []
    for i in range(steps):
        first = torch.full((SPEC.num_envs,), i == 0)
        out.append(("act", agent.act(obs, first)))
        metrics = agent.update(make_batch(seed=i))
        out += [(k, metrics[k]) for k in metrics.keys() if k.startswith("loss_")]
        obs = obs + 0.1 * torch.randn_like(obs)
    return out


def test_fused_optimizer_gives_the_same_updates(tiny_agent_factory):
    torch.manual_seed(0)
    fused = tiny_agent_factory(SPEC, fused_optimizer=True)
    _randomize_outputs(fused)
    loop = tiny_agent_factory(SPEC, fused_optimizer=False)
    loop.load_state_dict(fused.state_dict())
    assert fused.model_optim.defaults["fused"] and not loop.model_optim.defaults["fused"]
    got, want = _run(fused), _run(loop)
    for (name, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for (n, p), q in zip(fused.model.named_parameters(), loop.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_policy_q_gradient_reaches_the_action_only(tiny_agent_factory):
    """Q(z, a, detach=True) (the policy loss): a gradient for the action, none for the
    critic's parameters."""
    agent = tiny_agent_factory(SPEC, num_q=5)
    _randomize_outputs(agent)
    model = agent.model
    z = torch.randn(3, 4, model.latent_dim)
    a = (torch.rand(3, 4, SPEC.action_dim) * 2 - 1).requires_grad_(True)
    q = model.Q(z, a, return_type="avg", detach=True)
    (ga,) = torch.autograd.grad(q.sum(), a)
    assert ga.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
