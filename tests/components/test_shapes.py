"""Shapes of the registered encoders, dynamics and heads, for batches [B] and [T, B]."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import components
from components.layers import EnsembleMLP, SimNorm
from rlcore import registry
from rlcore.types import EnvSpec

components.import_all()

D, A, L, H, K = 6, 3, 16, 32, 21
SPEC = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=100)
LEADS = {"B": (4,), "TB": (3, 4)}


def _lead_params():
    return pytest.mark.parametrize("lead", list(LEADS.values()), ids=list(LEADS))


def _assert_simnorm(z: torch.Tensor, group: int = 8):
    groups = z.view(*z.shape[:-1], -1, group)
    torch.testing.assert_close(groups.sum(-1), torch.ones(groups.shape[:-1]))
    assert (z >= 0).all()


# ---------------------------------------------------------------------------------------
# Encoders and dynamics
# ---------------------------------------------------------------------------------------
@_lead_params()
@pytest.mark.parametrize("name", sorted(registry.registered("encoders")))
def test_encoder_shapes(name, lead):
    cls = registry.registered("encoders")[name]
    if name != "MLPEncoder":
        pytest.skip(f"no tiny shape recipe for encoders.{name}")
    enc = cls(SPEC, L, hidden_dim=H)
    z = enc(torch.randn(*lead, D))
    assert z.shape == (*lead, L)
    _assert_simnorm(z)


def test_mlp_encoder_rejects_pixels():
    cls = registry.registered("encoders")["MLPEncoder"]
    with pytest.raises(ValueError):
        cls(EnvSpec(obs_shape=(3, 64, 64), action_dim=A, episode_length=100), L)


@_lead_params()
@pytest.mark.parametrize("name", sorted(registry.registered("dynamics")))
def test_dynamics_shapes(name, lead):
    cls = registry.registered("dynamics")[name]
    dyn = cls(L, A, hidden_dim=H)
    z = F.softmax(torch.randn(*lead, L // 8, 8), -1).view(*lead, L)
    z2 = dyn(z, torch.rand(*lead, A) * 2 - 1)
    assert z2.shape == (*lead, L)
    _assert_simnorm(z2)


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------
@_lead_params()
def test_reward_head_shapes(lead):
    cls = registry.registered("heads")["DiscreteRegressionHead"]
    head = cls(L + A, K, hidden_dim=H)
    out = head(torch.randn(*lead, L), torch.randn(*lead, A))
    assert out.shape == (*lead, K)
    assert (out == 0).all()  # zero-initialized output layer


@_lead_params()
@pytest.mark.parametrize("num_q", [2, 5])
def test_q_head_shapes(lead, num_q):
    cls = registry.registered("heads")["EnsembleQHead"]
    head = cls(L + A, K, num_q=num_q, hidden_dim=H)
    z, a = torch.randn(*lead, L), torch.randn(*lead, A)
    assert head(z, a).shape == (num_q, *lead, K)
    members = torch.tensor([num_q - 1, 0])
    assert head(z, a, members).shape == (2, *lead, K)
    assert head(z, a, torch.tensor([1])).shape == (1, *lead, K)


def test_q_head_needs_two_members():
    cls = registry.registered("heads")["EnsembleQHead"]
    with pytest.raises(ValueError):
        cls(L + A, K, num_q=1)


@_lead_params()
@pytest.mark.parametrize("deterministic", [False, True])
def test_policy_head_shapes(lead, deterministic):
    cls = registry.registered("heads")["TanhGaussianPolicyHead"]
    head = cls(L, A, hidden_dim=H)
    # Large inputs push the pre-squash action far out to exercise the bounds.
    with torch.no_grad():
        head.net[-1].weight.mul_(500)
    a, info = head(torch.randn(*lead, L) * 10, deterministic=deterministic)
    assert a.shape == (*lead, A)
    assert (a.abs() <= 1).all()
    assert info["mean"].shape == (*lead, A) and info["log_std"].shape == (*lead, A)
    assert info["entropy"].shape == (*lead, 1) and info["scaled_entropy"].shape == (*lead, 1)
    assert (info["log_std"] >= -10).all() and (info["log_std"] <= 2).all()
    for v in info.values():
        assert torch.isfinite(v).all()
    if deterministic:
        torch.testing.assert_close(a, info["mean"])


@pytest.mark.parametrize("name", sorted(registry.registered("heads")))
def test_every_head_has_a_shape_test(name):
    known = {"DiscreteRegressionHead", "EnsembleQHead", "TanhGaussianPolicyHead"}
    if name not in known:
        pytest.skip(f"no shape recipe for heads.{name} in this file")


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
def test_simnorm_groups_sum_to_one():
    x = torch.randn(5, 7, 24) * 5
    y = SimNorm(8)(x)
    assert y.shape == x.shape
    _assert_simnorm(y)
    torch.testing.assert_close(y[..., :8], F.softmax(x[..., :8], -1))


def _manual_member(ens: EnsembleMLP, m: int) -> nn.Sequential:
    """Member m of `ens` as a plain Linear -> LayerNorm -> Mish stack with the same weights."""
    layers: list[nn.Module] = []
    for i in range(ens.num_layers):
        w, b = getattr(ens, f"w{i}")[m], getattr(ens, f"b{i}")[m, 0]
        lin = nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            lin.bias.copy_(b)
        layers.append(lin)
        if i < ens.num_layers - 1:
            ln = nn.LayerNorm(w.shape[1])
            with torch.no_grad():
                ln.weight.copy_(getattr(ens, f"ln_w{i}")[m, 0])
                ln.bias.copy_(getattr(ens, f"ln_b{i}")[m, 0])
            layers += [ln, nn.Mish()]
    return nn.Sequential(*layers)


@_lead_params()
def test_ensemble_mlp_equals_separate_members(lead):
    ens = EnsembleMLP(4, 7, [12, 10], 5, dropout=0.3)
    with torch.no_grad():  # move every parameter off its init so each one matters
        for p in ens.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ens.eval()  # dropout off
    x = torch.randn(*lead, 7)
    out = ens(x)
    assert out.shape == (4, *lead, 5)
    manual = torch.stack([_manual_member(ens, m)(x) for m in range(4)])
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    members = torch.tensor([3, 1])
    torch.testing.assert_close(ens(x, members), manual[members], atol=1e-5, rtol=1e-5)
    # Members are independent: gradients of one member's output touch only its slice.
    ens.zero_grad()
    ens(x, torch.tensor([2])).sum().backward()
    g = ens.w0.grad
    assert g[2].abs().sum() > 0 and g[[0, 1, 3]].abs().sum() == 0


def test_ensemble_mlp_dropout_only_in_training():
    ens = EnsembleMLP(2, 7, [64], 3, dropout=0.5)
    with torch.no_grad():
        ens.w1.normal_()
    x = torch.randn(8, 7)
    ens.eval()
    torch.testing.assert_close(ens(x), ens(x))
    ens.train()
    assert not torch.allclose(ens(x), ens(x))


def test_ensemble_mlp_init():
    ens = EnsembleMLP(3, 64, [128], 5, zero_output=True)
    assert (ens.w1 == 0).all() and (ens.b1 == 0).all() and (ens.b0 == 0).all()
    assert (ens.ln_w0 == 1).all() and (ens.ln_b0 == 0).all()
    # torch's trunc_normal_(std=0.02) (cut at +-2 absolute, as in TD-MPC2): std ~ 0.02.
    assert ens.w0.std().item() == pytest.approx(0.02, rel=0.05)
    assert not torch.equal(ens.w0[0], ens.w0[1])  # every member gets its own draw


# ---------------------------------------------------------------------------------------
# World model
# ---------------------------------------------------------------------------------------
@pytest.fixture
def model(tiny_world_model):
    return tiny_world_model(SPEC, num_q=5)


@_lead_params()
def test_world_model_verbs(model, lead):
    obs = torch.randn(*lead, D)
    a = torch.rand(*lead, A) * 2 - 1
    z = model.encode(obs)
    assert z.shape == (*lead, L)
    assert model.next(z, a).shape == (*lead, L)
    assert model.reward(z, a).shape == (*lead, K)
    assert model.decode(model.reward(z, a)).shape == (*lead, 1)
    pa, info = model.pi(z)
    assert pa.shape == (*lead, A) and (pa.abs() <= 1).all()
    assert model.Q(z, a, return_type="all").shape == (5, *lead, K)
    assert model.Q(z, a, return_type="all", target=True).shape == (5, *lead, K)
    for rt in ("min", "avg"):
        for target in (False, True):
            for detach in (False, True):
                q = model.Q(z, a, return_type=rt, target=target, detach=detach)
                assert q.shape == (*lead, 1)


def test_world_model_q_min_le_avg(model):
    with torch.no_grad():  # non-zero outputs, different per member
        model._Qs.net.w2.normal_()
    z, a = model.encode(torch.randn(10, D)), torch.rand(10, A) * 2 - 1
    torch.manual_seed(3)
    q_min = model.Q(z, a, return_type="min")
    torch.manual_seed(3)
    q_avg = model.Q(z, a, return_type="avg")
    assert (q_min <= q_avg + 1e-6).all()
    assert not torch.allclose(q_min, q_avg)
    with pytest.raises(ValueError):
        model.Q(z, a, return_type="max")
    # The two members are drawn at random on every call (5 choose 2 pairs).
    model.eval()  # no dropout: only the member choice varies
    pairs = {tuple(model.Q(z, a, return_type="avg")[:3].flatten().tolist()) for _ in range(30)}
    assert len(pairs) > 3


def test_target_q_starts_equal_and_needs_no_grad(model):
    online = dict(model._Qs.named_parameters())
    target = dict(model._target_Qs.named_parameters())
    assert online.keys() == target.keys()
    for k in online:
        torch.testing.assert_close(online[k], target[k])
        assert online[k].data_ptr() != target[k].data_ptr()  # a copy, not shared storage
        assert online[k].requires_grad and not target[k].requires_grad
    target_ids = {id(p) for p in target.values()}
    assert not target_ids & {id(p) for p in model.model_parameters()}
    # Target Q stays in eval mode (no dropout) when the model trains.
    model.train()
    assert not model._target_Qs.training and model._Qs.training
    # Polyak moves the target towards the online weights; sync copies them.
    with torch.no_grad():
        model._Qs.net.w0.add_(1.0)
    before = model._target_Qs.net.w0.clone()
    model.soft_update_targets(0.25)
    torch.testing.assert_close(model._target_Qs.net.w0, before + 0.25)
    model.sync_copies()
    torch.testing.assert_close(model._target_Qs.net.w0, model._Qs.net.w0)


def test_fresh_model_target_q_is_in_eval_mode(model):
    assert not model._target_Qs.training
    with torch.no_grad():
        model._target_Qs.net.w2.normal_()
    z, a = model.encode(torch.randn(4, D)), torch.rand(4, A) * 2 - 1
    q1 = model.Q(z, a, return_type="all", target=True)
    q2 = model.Q(z, a, return_type="all", target=True)
    torch.testing.assert_close(q1, q2, rtol=0, atol=0)  # deterministic: no dropout


def test_reward_and_q_are_zero_at_init(model):
    z, a = model.encode(torch.randn(3, 4, D)), torch.rand(3, 4, A) * 2 - 1
    r = model.reward(z, a)
    assert (r == 0).all()
    torch.testing.assert_close(model.decode(r), torch.zeros(3, 4, 1))
    assert (model.Q(z, a, return_type="all") == 0).all()
    for rt in ("min", "avg"):
        torch.testing.assert_close(model.Q(z, a, return_type=rt), torch.zeros(3, 4, 1))
        torch.testing.assert_close(model.Q(z, a, return_type=rt, target=True),
                                   torch.zeros(3, 4, 1))


def test_world_model_parameter_groups(model):
    groups = model.module_groups()
    assert set(groups) == {"encoder", "dynamics", "reward", "q", "policy"}
    policy_ids = {id(p) for p in groups["policy"].parameters()}
    model_ids = {id(p) for p in model.model_parameters()}
    assert not policy_ids & model_ids
    expected = sum(len(list(m.parameters())) for n, m in groups.items() if n != "policy")
    assert len(model_ids) == expected
