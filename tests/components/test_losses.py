"""TD-MPC2 losses: keys, finiteness, gradient routing, coefficients, TD target, scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from components.losses import PolicyLoss, RunningScale, WorldModelLoss, rho_weights
from rlcore import math as rmath
from rlcore.types import EnvSpec, Loss

D, A, T, B = 5, 2, 3, 6
SPEC = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=500)
GAMMA = 0.99
GROUPS = ("encoder", "dynamics", "reward", "q", "policy")


@pytest.fixture
def model(tiny_world_model):
    """A tiny model whose zero-initialized output layers are perturbed, so that every
    loss can send gradient through the heads into the latents."""
    m = tiny_world_model(SPEC, num_q=3)
    with torch.no_grad():
        m._reward.net[-1].weight.normal_(0, 0.1)
        m._Qs.net.w2.normal_(0, 0.1)
    m.sync_copies()
    return m.train()


@pytest.fixture
def batch():
    obs = torch.randn(T + 1, B, D)
    action = torch.rand(T, B, A) * 2 - 1
    reward = torch.randn(T, B, 1)
    terminated = torch.zeros(T, B, 1)
    return obs, action, reward, terminated


def rollout(model, obs, action):
    z = model.encode(obs[0])
    zs = [z]
    for t in range(action.shape[0]):
        z = model.next(z, action[t])
        zs.append(z)
    with torch.no_grad():
        next_z = model.encode(obs[1:])
    return torch.stack(zs), next_z


def grad_groups(model) -> dict[str, bool]:
    """Which module groups received a non-zero gradient."""
    out = {}
    for name, m in model.module_groups().items():
        out[name] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    return out


def run_term(model, batch, key, loss=None):
    loss = loss or WorldModelLoss()
    model.zero_grad(set_to_none=True)
    zs, next_z = rollout(model, batch[0], batch[1])
    terms = loss(model, zs, next_z, batch[1], batch[2], batch[3], GAMMA)
    terms[key].backward()
    return grad_groups(model), terms


# ---------------------------------------------------------------------------------------
def test_world_model_loss_keys_and_values(model, batch):
    loss = WorldModelLoss()
    assert isinstance(loss, Loss)
    zs, next_z = rollout(model, batch[0], batch[1])
    terms = loss(model, zs, next_z, *batch[1:], GAMMA)
    assert isinstance(terms, TensorDict)
    keys = set(terms.keys())
    assert {"loss_consistency", "loss_reward", "loss_value"} <= keys
    for k in keys:
        assert k.startswith("loss_") or k.startswith("stats/"), k
        assert terms[k].shape == () and torch.isfinite(terms[k]), k
    for k in keys:
        if k.startswith("loss_"):
            assert terms[k] >= 0 and terms[k].requires_grad, k
        else:
            assert not terms[k].requires_grad, k


def test_policy_loss_keys_and_values(model, batch):
    loss = PolicyLoss()
    assert isinstance(loss, Loss)
    zs, _ = rollout(model, batch[0], batch[1])
    terms = loss(model, zs, RunningScale())
    assert isinstance(terms, TensorDict)
    assert "loss_policy" in terms.keys()
    for k in terms.keys():
        assert k.startswith("loss_") or k.startswith("stats/"), k
        assert terms[k].shape == () and torch.isfinite(terms[k]), k


# ---------------------------------------------------------------------------------------
# Gradient routing
# ---------------------------------------------------------------------------------------
def test_consistency_grads(model, batch):
    g, _ = run_term(model, batch, "loss_consistency")
    assert g == {"encoder": True, "dynamics": True, "reward": False, "q": False,
                 "policy": False}


def test_reward_grads(model, batch):
    g, _ = run_term(model, batch, "loss_reward")
    assert g == {"encoder": True, "dynamics": True, "reward": True, "q": False,
                 "policy": False}


def test_value_grads(model, batch):
    g, _ = run_term(model, batch, "loss_value")
    assert g == {"encoder": True, "dynamics": True, "reward": False, "q": True,
                 "policy": False}
    assert all(p.grad is None for p in model._target_Qs.parameters())


def test_policy_grads_only_reach_policy(model, batch):
    model.zero_grad(set_to_none=True)
    zs, _ = rollout(model, batch[0], batch[1])  # zs carries graph to encoder + dynamics
    terms = PolicyLoss()(model, zs, RunningScale())
    terms["loss_policy"].backward()
    g = grad_groups(model)
    assert g == {"encoder": False, "dynamics": False, "reward": False, "q": False,
                 "policy": True}
    assert all(p.grad is None for p in model._target_Qs.parameters())
    for name in ("encoder", "dynamics", "q"):
        assert all(p.grad is None for p in model.module_groups()[name].parameters()), name


def test_next_z_carries_no_gradient(model, batch):
    """The consistency target is a stop-gradient: only the rollout side is trained."""
    zs, next_z = rollout(model, batch[0], batch[1])
    assert not next_z.requires_grad
    model.zero_grad(set_to_none=True)
    terms = WorldModelLoss()(model, zs.detach(), next_z, *batch[1:], GAMMA)
    assert not terms["loss_consistency"].requires_grad


@pytest.mark.parametrize("coef,key", [("consistency_coef", "loss_consistency"),
                                      ("reward_coef", "loss_reward"),
                                      ("value_coef", "loss_value")])
def test_zero_coefficient_gives_zero_gradient(model, batch, coef, key):
    g, terms = run_term(model, batch, key, WorldModelLoss(**{coef: 0.0}))
    assert terms[key] == 0
    assert not any(g.values())
    # The other terms are unaffected by that coefficient.
    torch.manual_seed(1)
    zs, next_z = rollout(model, batch[0], batch[1])
    full = WorldModelLoss()(model, zs, next_z, *batch[1:], GAMMA)
    torch.manual_seed(1)
    zero = WorldModelLoss(**{coef: 0.0})(model, zs, next_z, *batch[1:], GAMMA)
    for k in ("loss_consistency", "loss_reward", "loss_value"):
        if k != key:
            torch.testing.assert_close(zero[k], full[k])


def test_zero_entropy_coefficient_policy_loss_is_pure_q(model, batch):
    zs, _ = rollout(model, batch[0], batch[1])
    zs = zs.detach()
    torch.manual_seed(2)
    terms = PolicyLoss(entropy_coef=0.0)(model, zs, RunningScale(), update_scale=False)
    torch.manual_seed(2)
    a, _ = model.pi(zs)
    q = model.Q(zs, a, return_type="avg", detach=True)  # [T+1, B, 1]
    rho = 0.5 ** torch.arange(T + 1, dtype=torch.float32)
    torch.testing.assert_close(terms["loss_policy"], (rho * -q.mean(dim=(1, 2))).mean())


# ---------------------------------------------------------------------------------------
# Values of the terms
# ---------------------------------------------------------------------------------------
def test_consistency_and_reward_values(model, batch):
    obs, action, reward, terminated = batch
    zs, next_z = rollout(model, obs, action)
    terms = WorldModelLoss()(model, zs, next_z, action, reward, terminated, GAMMA)
    w = torch.tensor([0.5 ** t / T for t in range(T)])
    cons = torch.stack([F.mse_loss(zs[t + 1], next_z[t]) for t in range(T)])
    torch.testing.assert_close(terms["loss_consistency"], 20.0 * (w * cons).sum())
    rew = torch.stack([rmath.soft_ce(model.reward(zs[t], action[t]), reward[t], 21, -10, 10).mean()
                       for t in range(T)])
    torch.testing.assert_close(terms["loss_reward"], 0.1 * (w * rew).sum())


def test_value_loss_averages_members(model, batch):
    obs, action, reward, terminated = batch
    zs, next_z = rollout(model, obs, action)
    loss = WorldModelLoss()
    torch.manual_seed(4)
    terms = loss(model, zs, next_z, action, reward, terminated, GAMMA)
    torch.manual_seed(4)
    y = loss.td_target(model, next_z, reward, terminated, GAMMA)  # [T, B, 1]
    q = model.Q(zs[:-1], action, return_type="all")  # [Q, T, B, K]
    w = torch.tensor([0.5 ** t / T for t in range(T)])
    val = torch.stack([
        torch.stack([rmath.soft_ce(q[k, t], y[t], 21, -10, 10).mean() for k in range(3)]).mean()
        for t in range(T)])
    torch.testing.assert_close(terms["loss_value"], 0.1 * (w * val).sum())


def test_td_target_formula(model, batch):
    _, _, reward, _ = batch
    next_z = model.encode(torch.randn(T, B, D)).detach()
    terminated = (torch.rand(T, B, 1) < 0.5).float()
    loss = WorldModelLoss()
    torch.manual_seed(9)
    y = loss.td_target(model, next_z, reward, terminated, GAMMA)
    torch.manual_seed(9)
    a, _ = model.pi(next_z)
    q = model.Q(next_z, a, return_type="min", target=True)
    torch.testing.assert_close(y, reward + GAMMA * (1 - terminated) * q)
    assert not y.requires_grad
    # Where terminated, no bootstrapping.
    done = terminated.bool()
    torch.testing.assert_close(y[done], reward[done])


def test_td_target_uses_target_q(model, batch):
    _, _, reward, terminated = batch
    next_z = model.encode(torch.randn(T, B, D)).detach()
    loss = WorldModelLoss()
    torch.manual_seed(11)
    y0 = loss.td_target(model, next_z, reward, terminated, GAMMA)
    with torch.no_grad():  # change the online critic only
        for p in model._Qs.parameters():
            p.add_(torch.randn_like(p))
    torch.manual_seed(11)
    y1 = loss.td_target(model, next_z, reward, terminated, GAMMA)
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    with torch.no_grad():  # changing the target critic does change it (a random change:
        # adding a constant to every output weight shifts all logits alike, which the
        # softmax of the two-hot decoding ignores)
        w = model._target_Qs.net.w2
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(11)
    y2 = loss.td_target(model, next_z, reward, terminated, GAMMA)
    assert not torch.allclose(y0, y2)


# ---------------------------------------------------------------------------------------
# Running scale and temporal weights
# ---------------------------------------------------------------------------------------
def test_running_scale():
    s = RunningScale(tau=0.1)
    assert s.value.item() == 1.0
    x = torch.linspace(0, 1000, 10_001)  # P95 - P5 = 900
    s.update(x)
    assert s.value.item() == pytest.approx(1 + 0.1 * (900 - 1), rel=1e-5)
    s.update(x)
    expected = (1 + 0.1 * 899) + 0.1 * (900 - (1 + 0.1 * 899))
    assert s.value.item() == pytest.approx(expected, rel=1e-5)
    state = s.state_dict()
    s.reset()
    assert s.value.item() == 1.0
    s.load_state_dict(state)
    assert s.value.item() == pytest.approx(expected, rel=1e-5)
    state["value"].fill_(3.0)  # state_dict is a copy
    assert s.value.item() == pytest.approx(expected, rel=1e-5)


def test_running_scale_floor_is_one():
    s = RunningScale(tau=0.5)
    s.value.fill_(5.0)
    s.update(torch.full((100, 1), 3.0))  # no spread -> target max(0, 1) = 1
    assert s.value.item() == pytest.approx(3.0)
    s = RunningScale(tau=0.01)
    s.update(torch.randn(256, 1) * 0.01)
    assert s.value.item() == pytest.approx(1.0)


def test_policy_loss_updates_scale_only_when_asked(model, batch):
    zs, _ = rollout(model, batch[0], batch[1])
    with torch.no_grad():  # a wide spread of Q values
        model._Qs.net.w2.mul_(300)
    scale = RunningScale(tau=0.5)
    PolicyLoss()(model, zs, scale, update_scale=False)
    assert scale.value.item() == 1.0
    terms = PolicyLoss()(model, zs, scale)
    assert scale.value.item() > 1.0
    torch.testing.assert_close(terms["stats/running_scale"], scale.value)


def test_rho_weights():
    for rho, T_ in [(0.5, 3), (0.9, 5), (1.0, 4)]:
        w = rho_weights(rho, T_, "cpu")
        assert w.shape == (T_,)
        torch.testing.assert_close(w, torch.tensor([rho ** t / T_ for t in range(T_)]))
        expected_sum = (T_ if rho == 1.0 else (1 - rho ** T_) / (1 - rho)) / T_
        assert w.sum().item() == pytest.approx(expected_sum, rel=1e-6)
