"""The variant's parts: auxiliary heads, termination, update pathways, EMA copies, validation."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from components.agent import TDMPC2Agent
from components.dynamics import MLPDynamics
from components.encoders import MLPEncoder
from components.heads import (DiscreteRegressionHead, EnsembleQHead, JointAuxQHead,
                              SeparateAuxQHead, TanhGaussianPolicyHead, TerminationHead)
from components.losses import AuxValueLoss, PolicyLoss, TerminationLoss, WorldModelLoss
from components.planners.cem import CEMPlanner
from components.planners.mppi import MPPIPlanner
from components.world_model import WorldModel
from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec

D, A, T, B, E, L, H = 5, 2, 3, 8, 3, 16, 32


def spec(episodic=False):
    return EnvSpec(obs_shape=(D,), action_dim=A, episode_length=500, num_envs=E,
                   episodic=episodic)


def model_factory(aux_q_head=JointAuxQHead, aux_discounts=(0.9, 0.95), **kwargs):
    return functools.partial(
        WorldModel, encoder=functools.partial(MLPEncoder, hidden_dim=H),
        dynamics=functools.partial(MLPDynamics, hidden_dim=H),
        reward_head=functools.partial(DiscreteRegressionHead, hidden_dim=H),
        q_head=functools.partial(EnsembleQHead, hidden_dim=H, num_q=2),
        policy_head=functools.partial(TanhGaussianPolicyHead, hidden_dim=H),
        termination_head=functools.partial(TerminationHead, hidden_dim=H),
        aux_q_head=functools.partial(aux_q_head, hidden_dim=H), aux_discounts=aux_discounts,
        latent_dim=L, num_bins=21, **kwargs)


def make_agent(episodic=False, planner=MPPIPlanner, model_kwargs=None, **kwargs):
    return TDMPC2Agent(
        spec(episodic), "cpu", world_model=model_factory(**(model_kwargs or {})),
        planner=functools.partial(planner, num_samples=32, num_pi_trajs=4, num_elites=8,
                                  iterations=2),
        model_loss=WorldModelLoss, policy_loss=PolicyLoss,
        extra_losses=[AuxValueLoss, TerminationLoss], **kwargs)


def make_batch(seed=0, terminal=False):
    g = torch.Generator().manual_seed(seed)
    action = torch.rand(T + 1, B, A, generator=g) * 2 - 1
    reward = torch.randn(T + 1, B, generator=g)
    action[0], reward[0] = float("nan"), float("nan")
    terminated = torch.zeros(T + 1, B, dtype=torch.bool)
    if terminal:
        terminated[T, : B // 2] = True
    return TensorDict({OBS: torch.randn(T + 1, B, D, generator=g), ACTION: action,
                       REWARD: reward, TERMINATED: terminated}, batch_size=[T + 1, B])


def params_of(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def scramble_aux(model):
    with torch.no_grad():
        for m in (model._aux_Qs, model._target_aux_Qs):
            for p in m.parameters():
                p.normal_()


# -- multi-gamma auxiliary heads ------------------------------------------------------
@pytest.mark.parametrize("head", [JointAuxQHead, SeparateAuxQHead])
@pytest.mark.parametrize("lead", [(B,), (T, B)])
def test_aux_head_shapes(head, lead):
    h = head(L + A, 21, 3, hidden_dim=H)
    z, a = torch.randn(*lead, L), torch.randn(*lead, A)
    assert h(z, a).shape == (*lead, 3, 21)
    assert torch.all(h(z, a) == 0)  # zero-initialized output


def test_no_aux_discounts_builds_nothing():
    model = model_factory(aux_discounts=())(spec())
    assert model._aux_Qs is None and "aux_q" not in model.module_groups()
    assert list(AuxValueLoss()(model, None, None, torch.zeros(T, B, A), None, None, 0.99).keys()) == []


@pytest.mark.parametrize("bad", [(0.0,), (1.0,), (0.9, 1.5), (-0.1,)])
def test_bad_aux_discount_raises(bad):
    with pytest.raises(ValueError, match="aux_discounts"):
        model_factory(aux_discounts=bad)(spec())


@pytest.mark.parametrize("head", [JointAuxQHead, SeparateAuxQHead])
def test_aux_heads_are_training_only(head):
    """Planner scores, the policy loss and the primary TD target ignore the aux weights."""
    agent = make_agent(model_kwargs={"aux_q_head": head})
    model = agent.model
    z = torch.randn(E, 4, L).softmax(-1)
    acts = torch.rand(agent.planner.horizon, E, 4, A) * 2 - 1
    batch = make_batch()
    zs, next_z, action, reward, terminated = agent._prepare(batch, "full")

    def readouts():
        torch.manual_seed(3)
        score = agent.planner._score(z, acts)
        torch.manual_seed(3)
        td = agent.model_loss.td_target(model, next_z, reward, terminated, agent.discount)
        torch.manual_seed(3)
        pi = agent.policy_loss(model, zs, agent.scale, update_scale=False)["loss_policy"]
        return score, td, pi

    before = readouts()
    scramble_aux(model)
    after = readouts()
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # ... while the auxiliary loss does change, and sends gradients into the representation.
    aux = AuxValueLoss()(model, zs, next_z, action, reward, terminated, agent.discount)
    aux["loss_aux_value"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model._encoder.parameters())
    assert all(p.grad is None for p in model._Qs.parameters())
    assert all(p.grad is None for p in model._pi.parameters())


def test_aux_targets_use_their_own_discounts():
    model = model_factory(aux_discounts=(0.5,))(spec())
    with torch.no_grad():  # aux target Q decodes to a known value: put all mass on one bin
        model._target_aux_Qs.net[-1].bias.fill_(-1e4)
        model._target_aux_Qs.net[-1].bias[15] = 1e4  # bin 15 of 21 over [-10, 10] = symlog 5
    zs = torch.randn(T + 1, B, L).softmax(-1)
    reward = torch.ones(T, B, 1)
    terminated = torch.zeros(T, B, 1)
    terminated[0] = 1.0
    out = AuxValueLoss()(model, zs, zs[1:], torch.zeros(T, B, A), reward, terminated, 0.99)
    q = torch.expm1(torch.tensor(5.0))
    expected = (1 + 0.5 * q * (T - 1) / T).item()  # mean over t of r + g (1-d) q
    assert out["stats/aux_td_target_mean/gamma_0.5"].item() == pytest.approx(expected, rel=1e-4)


# -- termination ----------------------------------------------------------------------
def test_termination_head_only_for_episodic_tasks():
    assert model_factory()(spec(False))._termination is None
    model = model_factory()(spec(True))
    assert model.episodic and "termination" in model.module_groups()
    assert model.termination(torch.randn(B, L)).shape == (B, 1)


def test_termination_loss_trains_on_post_transition_latents():
    agent = make_agent(episodic=True)
    batch = make_batch(terminal=True)
    out = agent.update(batch)
    assert "loss_termination" in out.keys() and torch.isfinite(out["loss_termination"])
    # post-transition: logits are computed on zs[1:]
    zs, next_z, action, reward, terminated = agent._prepare(batch, "full")
    seen = []
    orig = agent.model.termination
    agent.model.termination = lambda z, logits=False: (seen.append(z), orig(z, logits=logits))[1]
    TerminationLoss()(agent.model, zs, next_z, action, reward, terminated, 0.99)
    torch.testing.assert_close(seen[0], zs[1:])


def test_planner_weights_rewards_by_survival():
    agent = make_agent(episodic=True)
    model = agent.model
    z = torch.randn(E, 4, L).softmax(-1)
    acts = torch.rand(agent.planner.horizon, E, 4, A) * 2 - 1
    with torch.no_grad():
        model._reward.net[-1].bias[15] = 50.0  # a positive reward everywhere
        torch.manual_seed(0)
        alive = agent.planner._score(z, acts)
        model._termination.net[-1].bias.fill_(50.0)  # terminate surely after step 0
        torch.manual_seed(0)
        dead = agent.planner._score(z, acts)
    r0 = model.decode(model.reward(z, acts[0])).squeeze(-1)
    torch.testing.assert_close(dead, r0, rtol=1e-4, atol=1e-4)
    assert torch.all(alive > dead)


@pytest.mark.parametrize("soft", [False, True])
def test_planner_cuts_trajectories_where_termination_is_likely(soft):
    """The paper's rule (default): from the first step whose termination probability
    exceeds 0.5 a trajectory earns nothing more; `soft_termination` weights each later
    step by the survival probability instead."""
    agent = make_agent(episodic=True)
    agent.planner.soft_termination = soft
    model, H, gamma = agent.model, agent.planner.horizon, agent.discount
    z = torch.randn(E, 4, L).softmax(-1)
    acts = torch.rand(H, E, 4, A) * 2 - 1
    with torch.no_grad():
        model._reward.net[-1].bias[15] = 50.0  # a positive reward everywhere
        model._termination.net[-1].weight.zero_()
        model._termination.net[-1].bias.fill_(math.log(0.6 / 0.4))  # P(end) = 0.6
        torch.manual_seed(0)
        score = agent.planner._score(z, acts)
        r, zt = [], z
        for t in range(H):
            r.append(model.decode(model.reward(zt, acts[t])).squeeze(-1))
            zt = model.next(zt, acts[t])
        torch.manual_seed(0)
        q = model.Q(zt, model.pi(zt, target=True)[0], return_type="avg").squeeze(-1)
    if soft:
        want = sum(gamma ** t * 0.4 ** t * r[t] for t in range(H)) + (gamma * 0.4) ** H * q
    else:
        want = r[0]
    torch.testing.assert_close(score, want, rtol=1e-4, atol=1e-4)


def test_termination_loss_is_the_plain_mean_by_default():
    agent = make_agent(episodic=True)
    batch = make_batch(terminal=True)
    zs, next_z, action, reward, terminated = agent._prepare(batch, "full")
    logits = agent.model.termination(zs[1:], logits=True)
    plain = F.binary_cross_entropy_with_logits(logits, terminated)
    out = TerminationLoss()(agent.model, zs, next_z, action, reward, terminated, 0.99)
    torch.testing.assert_close(out["loss_termination"], plain)
    per_t = F.binary_cross_entropy_with_logits(logits, terminated, reduction="none").mean((1, 2))
    weighted = (0.5 ** torch.arange(per_t.shape[0]) * per_t).mean()
    out = TerminationLoss(rho_weighted=True)(agent.model, zs, next_z, action, reward,
                                             terminated, 0.99)
    torch.testing.assert_close(out["loss_termination"], weighted)


def test_td_target_stops_at_terminal_states():
    agent = make_agent(episodic=True)
    batch = make_batch(terminal=True)
    zs, next_z, action, reward, terminated = agent._prepare(batch, "full")
    with torch.no_grad():
        agent.model._target_Qs.net.b2.fill_(-1e4)
        agent.model._target_Qs.net.b2[..., 15] = 1e4
    y = agent.model_loss.td_target(agent.model, next_z, reward, terminated, agent.discount)
    torch.testing.assert_close(y[terminated.bool()], reward[terminated.bool()])
    assert torch.all(y[~terminated.bool()] > reward[~terminated.bool()])


# -- update pathways ------------------------------------------------------------------
@pytest.mark.parametrize("pathway, trained, frozen", [
    ("full", {"encoder", "dynamics", "reward", "q", "aux_q", "policy"}, set()),
    ("actor_critic", {"q", "aux_q", "policy"}, {"encoder", "dynamics", "reward"}),
    ("policy", {"policy"}, {"encoder", "dynamics", "reward", "q", "aux_q"}),
])
def test_pathways_train_what_they_should(pathway, trained, frozen):
    agent = make_agent()
    for _ in range(2):  # move away from the zero-initialized heads first
        agent.update(make_batch(1), "full")
    groups = agent.model.module_groups()
    before = {n: params_of(m) for n, m in groups.items()}
    out = agent.update(make_batch(2), pathway)
    for name, m in groups.items():
        changed = any(not torch.equal(before[name][k], v) for k, v in params_of(m).items())
        assert changed == (name in trained), (pathway, name)
    assert ("loss_consistency" in out.keys()) == (pathway == "full")
    assert ("loss_value" in out.keys()) == (pathway != "policy")
    assert "loss_policy" in out.keys()


def test_unknown_pathway_raises():
    with pytest.raises(ValueError, match="pathway"):
        make_agent().update(make_batch(), "model_only")


# -- EMA copies -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_bad_ema_rate_raises(bad):
    with pytest.raises(ValueError, match="ema_tau"):
        model_factory(policy_ema_tau=bad)(spec())


def test_ema_copies_follow_at_their_rate_and_act():
    agent = make_agent(model_kwargs={"policy_ema_tau": 0.05, "encoder_ema_tau": 0.5})
    m = agent.model
    ema_pi, ema_enc = params_of(m._ema_pi), params_of(m._ema_encoder)
    agent.update(make_batch())
    for k, v in m._ema_pi.named_parameters():
        online = dict(m._pi.named_parameters())[k]
        torch.testing.assert_close(v, ema_pi[k] + 0.05 * (online - ema_pi[k]))
    for k, v in m._ema_encoder.named_parameters():
        online = dict(m._encoder.named_parameters())[k]
        torch.testing.assert_close(v, ema_enc[k] + 0.5 * (online - ema_enc[k]))
    # acting and TD targets read the EMA policy: scrambling the online policy changes neither
    z = torch.randn(E, L).softmax(-1)
    torch.manual_seed(0)
    a1, _ = m.pi(z, target=True)
    with torch.no_grad():
        for p in m._pi.parameters():
            p.normal_()
    torch.manual_seed(0)
    a2, _ = m.pi(z, target=True)
    torch.testing.assert_close(a1, a2)
    # and TD-target latents come from the EMA encoder
    obs = torch.randn(B, D)
    torch.testing.assert_close(m.encode(obs, target=True), m._ema_encoder(obs))


# -- validation -----------------------------------------------------------------------
def test_validation_changes_no_training_state():
    agent = make_agent(episodic=True, grad_log_every=0)
    agent.update(make_batch(0, terminal=True))
    agent.scale.value.fill_(3.0)
    state = {k: v.clone() for k, v in agent.model.state_dict().items()}
    optim = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for s in agent.model_optim.state.values()]
    rng = torch.get_rng_state()
    out = agent.validate(make_batch(5, terminal=True))
    for key in ("loss_consistency", "loss_reward", "loss_value", "loss_aux_value",
                "loss_termination", "loss_policy"):
        assert torch.isfinite(out[key]), key
    assert agent.scale.value.item() == 3.0
    for k, v in agent.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None or True for p in agent.model.parameters())
    new_optim = list(agent.model_optim.state.values())
    for a, b in zip(optim, new_optim):
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    assert torch.equal(torch.get_rng_state(), rng)
    assert agent.num_updates == 1


# -- gradient logging -----------------------------------------------------------------
def test_grad_norms_per_loss_per_group():
    agent = make_agent(grad_log_every=1)
    out = agent.update(make_batch())
    keys = [k for k in out.keys() if k.startswith("grad/")]
    assert "grad/consistency/encoder" in keys and "grad/aux_value/aux_q" in keys
    assert out["grad/consistency/q"].item() == 0.0  # consistency does not reach Q
    assert out["grad/value/q"].item() > 0.0
    assert not any(k.startswith("grad/") for k in make_agent().update(make_batch()).keys())


@pytest.mark.parametrize("planner", [MPPIPlanner, CEMPlanner])
def test_variant_agent_acts(planner):
    agent = make_agent(episodic=True, planner=planner)
    a = agent.act(torch.randn(E, D), torch.ones(E, dtype=torch.bool))
    assert a.shape == (E, A) and torch.all(a.abs() <= 1)
