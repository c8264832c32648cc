"""Reset strategies: what they touch, their exact arithmetic, the agent's after-reset
bookkeeping (optimizer moments, target copies, running scale), schedules, validation,
state round trips and registration."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from tensordict import TensorDict

from components.agent import TDMPC2Agent
from components.dynamics import MLPDynamics
from components.encoders import MLPEncoder
from components.heads import (DiscreteRegressionHead, EnsembleQHead, JointAuxQHead,
                              SeparateAuxQHead, TanhGaussianPolicyHead, TerminationHead)
from components.layers import layer_parameter_names
from components.losses import AuxValueLoss, PolicyLoss, TerminationLoss, WorldModelLoss
from components.planners.mppi import MPPIPlanner
from components.resets import DEFAULT_GROUPS, FullReset, NoReset, ResetStrategy, ShrinkPerturb
from components.world_model import WorldModel
from rlcore.registry import registered
from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec

D, A, T, B, E, L, H = 5, 2, 3, 8, 3, 16, 32
SPEC = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=500, num_envs=E)
GROUP_PREFIX = {"encoder": "_encoder.", "dynamics": "_dynamics.", "reward": "_reward.",
                "termination": "_termination.", "q": "_Qs.", "aux_q": "_aux_Qs.",
                "policy": "_pi."}
COPY_GROUP = {"_target_Qs": "q", "_target_aux_Qs": "aux_q", "_ema_pi": "policy",
              "_ema_encoder": "encoder"}


def make_batch(seed: int = 0) -> TensorDict:
    """A replay batch [T+1, B] in the arrival convention: row 0 action/reward are NaN."""
    g = torch.Generator().manual_seed(seed)
    action = torch.rand(T + 1, B, A, generator=g) * 2 - 1
    reward = torch.randn(T + 1, B, generator=g)
    action[0], reward[0] = float("nan"), float("nan")
    return TensorDict({OBS: torch.randn(T + 1, B, D, generator=g), ACTION: action,
                       REWARD: reward, TERMINATED: torch.zeros(T + 1, B, dtype=torch.bool)},
                      batch_size=[T + 1, B])


def make_full_agent(aux_q_head=JointAuxQHead, **agent_kwargs) -> TDMPC2Agent:
    """An episodic agent with every optional part: termination head, auxiliary Q heads,
    EMA copies of policy and encoder."""
    spec = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=500, num_envs=E,
                   episodic=True)
    model = functools.partial(
        WorldModel, encoder=functools.partial(MLPEncoder, hidden_dim=H),
        dynamics=functools.partial(MLPDynamics, hidden_dim=H),
        reward_head=functools.partial(DiscreteRegressionHead, hidden_dim=H),
        q_head=functools.partial(EnsembleQHead, hidden_dim=H, num_q=2),
        policy_head=functools.partial(TanhGaussianPolicyHead, hidden_dim=H),
        termination_head=functools.partial(TerminationHead, hidden_dim=H),
        aux_q_head=functools.partial(aux_q_head, hidden_dim=H), aux_discounts=(0.9, 0.95),
        latent_dim=L, num_bins=21, policy_ema_tau=0.05, encoder_ema_tau=0.05)
    return TDMPC2Agent(spec, "cpu", world_model=model,
                       planner=functools.partial(MPPIPlanner, num_samples=32, num_pi_trajs=4,
                                                 num_elites=8, iterations=2),
                       model_loss=WorldModelLoss, policy_loss=PolicyLoss,
                       extra_losses=[AuxValueLoss, TerminationLoss], **agent_kwargs)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def is_copy(name: str) -> bool:
    return name.split(".")[0] in COPY_GROUP


def group_of(name: str) -> str:
    return next(g for g, p in GROUP_PREFIX.items() if name.startswith(p))


def changed(before, model) -> set[str]:
    return {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}


def trained(agent, n: int = 2):
    """A few updates, so every parameter has left its init and Adam has moments."""
    for i in range(n):
        agent.update(make_batch(i))
    return agent


def output_weights(model) -> dict[str, torch.Tensor]:
    """The zero-initialized output layers: reward head and Q ensemble."""
    return {"reward.weight": model._reward.net[-1].weight,
            "reward.bias": model._reward.net[-1].bias,
            "q.weight": model._Qs.net.w2, "q.bias": model._Qs.net.b2}


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# -- layers.layer_parameter_names ------------------------------------------------------
@pytest.mark.parametrize("aux", [JointAuxQHead, SeparateAuxQHead])
def test_layer_parameter_names_cover_each_module_in_order(aux):
    model = make_full_agent(aux).model
    for gname, module in model.module_groups().items():
        layers = layer_parameter_names(module)
        flat = [n for layer in layers for n in layer]
        assert flat == [n for n, _ in module.named_parameters()], gname
        assert all(layers), gname
    # A NormedLinear hidden layer: Linear weight/bias with its LayerNorm weight/bias.
    assert layer_parameter_names(model._reward)[0] == [
        "net.0.0.weight", "net.0.0.bias", "net.0.1.weight", "net.0.1.bias"]
    assert layer_parameter_names(model._reward)[-1] == ["net.2.weight", "net.2.bias"]
    assert layer_parameter_names(model._Qs)[-1] == ["net.w2", "net.b2"]


# -- exactly the targeted parameters change --------------------------------------------
@pytest.mark.parametrize("groups", [("q",), ("encoder", "policy"), ("dynamics", "reward"),
                                    ("termination", "aux_q"), DEFAULT_GROUPS])
@pytest.mark.parametrize("cls", [ShrinkPerturb, FullReset])
def test_only_targeted_groups_change(cls, groups):
    agent = trained(make_full_agent())
    model = agent.model
    before = snapshot(model)
    assert cls(groups=groups, every=5)(agent, 5) is True
    moved = changed(before, model)
    # Online parameters: every one of the targeted groups moved (training took them all
    # away from their init), nothing else did.
    assert {k for k in moved if not is_copy(k)} == \
        {k for k in before if not is_copy(k) and group_of(k) in groups}
    # Target/EMA copies: only those of the reset groups were re-synced.
    assert {COPY_GROUP[k.split(".")[0]] for k in moved if is_copy(k)} <= set(groups)


@pytest.mark.parametrize("cls", [ShrinkPerturb, FullReset])
def test_last_k_1_touches_only_last_layer(cls):
    agent = trained(make_full_agent())
    model = agent.model
    before = snapshot(model)
    groups = ("encoder", "dynamics", "reward", "q", "aux_q", "policy")
    expected = set()
    for g in groups:
        module = model.module_groups()[g]
        expected |= {GROUP_PREFIX[g] + n for n in layer_parameter_names(module)[-1]}
    assert cls(groups=groups, every=1, last_k=1)(agent, 1)
    assert {k for k in changed(before, model) if not is_copy(k)} == expected


def test_last_k_larger_than_depth_resets_everything():
    agent = trained(make_full_agent())
    before = snapshot(agent.model)
    FullReset(groups=("policy",), every=1, last_k=100)(agent, 1)
    assert {k for k in changed(before, agent.model) if not is_copy(k)} == \
        {k for k in before if k.startswith("_pi.")}


def test_missing_default_groups_are_skipped_silently(tiny_agent_factory, recwarn):
    agent = trained(tiny_agent_factory(SPEC))  # no aux_q, no termination
    before = snapshot(agent.model)
    assert ShrinkPerturb(every=1)(agent, 1)
    assert {group_of(k) for k in changed(before, agent.model) if not is_copy(k)} == \
        {"encoder", "dynamics", "reward", "q", "policy"}
    assert not [w for w in recwarn if "group" in str(w.message)]
    # A missing group outside the defaults, named explicitly, is skipped with a warning.
    with pytest.warns(UserWarning, match="termination"):
        assert FullReset(groups=("q", "termination"), every=1)(agent, 1)
    # Only missing groups: nothing to reset, nothing reported.
    assert FullReset(groups=("aux_q",), every=1)(agent, 1) is False


# -- the arithmetic --------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_shrink_perturb_interpolation_is_exact(tiny_agent_factory, alpha):
    agent = trained(tiny_agent_factory(SPEC))
    model = agent.model
    groups = ("encoder", "dynamics", "reward", "q", "policy")
    copies = {g: copy.deepcopy(model.module_groups()[g]) for g in groups}
    before = {g: {n: p.detach().clone() for n, p in m.named_parameters()}
              for g, m in copies.items()}
    torch.manual_seed(123)
    ShrinkPerturb(groups=groups, every=1, alpha=alpha)(agent, 1)
    # Draw the fresh inits the same way: same seed, each group's own init in group order.
    torch.manual_seed(123)
    fresh = {}
    for g in groups:
        copies[g].reset_parameters()
        fresh[g] = {n: p.detach() for n, p in copies[g].named_parameters()}
    for g in groups:
        for n, p in model.module_groups()[g].named_parameters():
            assert torch.equal(p, alpha * before[g][n] + (1 - alpha) * fresh[g][n]), (g, n)
            if alpha == 1.0:
                assert torch.equal(p, before[g][n]), (g, n)
            if alpha == 0.0:
                assert torch.equal(p, fresh[g][n]), (g, n)
    if alpha == 0.0:  # zero-initialized output layers of reward and Q are zero again
        for k, w in output_weights(model).items():
            assert not w.any(), k


def test_noise_form_statistics(tiny_agent_factory):
    agent = trained(tiny_agent_factory(SPEC))
    model = agent.model
    alpha, sigma = 0.8, 0.05
    before = snapshot(model)
    assert ShrinkPerturb(groups=("dynamics", "q"), every=1, alpha=alpha,
                         noise_std=sigma)(agent, 1)
    residual = torch.cat([(p - alpha * before[k]).flatten()
                          for k, p in model.named_parameters()
                          if k.startswith(("_dynamics.", "_Qs."))])
    assert residual.numel() > 2000
    assert abs(residual.std().item() - sigma) < 0.05 * sigma
    assert abs(residual.mean().item()) < 5 * sigma / residual.numel() ** 0.5
    # noise_std = 0 is a pure shrink.
    before = snapshot(model)
    ShrinkPerturb(groups=("reward",), every=1, alpha=0.5, noise_std=0.0)(agent, 1)
    for k, p in model.named_parameters():
        if k.startswith("_reward."):
            assert torch.equal(p, 0.5 * before[k]), k


def test_full_reset_redraws_init(tiny_agent_factory):
    agent = trained(tiny_agent_factory(SPEC), 3)
    model = agent.model
    assert all(w.any() for w in output_weights(model).values())  # training moved them
    before = snapshot(model)
    assert FullReset(groups=("reward", "q", "policy"), every=1)(agent, 1)
    for k, w in output_weights(model).items():
        assert not w.any(), k
    # Every other parameter of the reset groups differs from before (training had moved
    # them all away from their init); the encoder and dynamics are untouched.
    assert {k for k in changed(before, model) if not is_copy(k)} == \
        {k for k in before if k.startswith(("_reward.", "_Qs.", "_pi."))}
    # LayerNorm scales are back to one, hidden Linear weights look like the init (std 0.02).
    assert torch.equal(model._reward.net[0][1].weight, torch.ones(H))
    assert abs(model._reward.net[0][0].weight.std().item() - 0.02) < 0.005


def test_fresh_draws_follow_the_global_rng(tiny_agent_factory):
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        agent = tiny_agent_factory(SPEC)
        torch.manual_seed(7)
        FullReset(groups=("encoder",), every=1)(agent, 1)
        outs.append(snapshot(agent.model))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


# -- the agent's bookkeeping -------------------------------------------------------------
def test_optimizer_moments_of_touched_params_are_cleared(tiny_agent_factory):
    agent = trained(tiny_agent_factory(SPEC), 3)
    model = agent.model
    optim_state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                   for o in (agent.model_optim, agent.pi_optim) for p, s in o.state.items()}
    assert len(optim_state) == sum(1 for n, _ in model.named_parameters() if not is_copy(n))
    assert ShrinkPerturb(groups=("q", "policy"), every=1, last_k=1)(agent, 1)
    touched = {id(model._Qs.net.w2), id(model._Qs.net.b2),
               id(model._pi.net[-1].weight), id(model._pi.net[-1].bias)}
    for optim in (agent.model_optim, agent.pi_optim):
        for group in optim.param_groups:
            for p in group["params"]:
                if id(p) in touched:  # the state of a new optimizer: step 0, zero moments
                    assert all(not v.any() for v in optim.state[p].values())
                else:
                    assert p in optim.state
                    for k, v in optim.state[p].items():
                        assert torch.equal(v, optim_state[id(p)][k]), k
    # Training continues from fresh moments.
    out = agent.update(make_batch(9))
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith("loss_"))
    assert all(p in agent.model_optim.state for p in model._Qs.parameters())


def test_target_q_resynced_and_scale_reset(tiny_agent_factory):
    agent = trained(tiny_agent_factory(SPEC), 3)
    model = agent.model
    assert any(not torch.equal(t, p) for t, p in zip(model._target_Qs.parameters(),
                                                     model._Qs.parameters()))
    agent.scale.value.fill_(3.5)  # as after Q estimates have spread
    FullReset(groups=("q",), every=1)(agent, 1)
    for t, p in zip(model._target_Qs.parameters(), model._Qs.parameters()):
        assert torch.equal(t, p)
    assert agent.scale.value.item() == 1.0


def test_ema_copies_of_reset_groups_resynced():
    agent = trained(make_full_agent(), 2)
    model = agent.model
    ShrinkPerturb(groups=("policy", "aux_q"), every=1)(agent, 1)
    for copy_, online in ((model._ema_pi, model._pi), (model._target_aux_Qs, model._aux_Qs)):
        for t, p in zip(copy_.parameters(), online.parameters()):
            assert torch.equal(t, p)
    # Copies of groups that were not reset are left alone.
    assert any(not torch.equal(t, p) for t, p in zip(model._ema_encoder.parameters(),
                                                     model._encoder.parameters()))


# -- schedules ---------------------------------------------------------------------------
def fired_at(agent, n: int) -> list[int]:
    """Update counts after which agent.update reported a reset, over n more updates."""
    out = []
    for i in range(n):
        if "stats/reset" in agent.update(make_batch(i)).keys():
            out.append(agent.num_updates)
    return out


@pytest.mark.parametrize("reset, expected", [
    (functools.partial(ShrinkPerturb, every=3, groups=("q",)), [3, 6, 9]),
    (functools.partial(FullReset, at_updates=(2, 5), groups=("policy",)), [2, 5]),
    (functools.partial(FullReset, every=4, at_updates=(3,), groups=("reward",)), [3, 4, 8]),
    (NoReset, []),
])
def test_schedule_through_agent_update(tiny_agent_factory, reset, expected):
    agent = tiny_agent_factory(SPEC, reset=reset)
    assert fired_at(agent, 10) == expected
    assert agent.reset_strategy.num_resets == len(expected)


def test_due_and_no_reset_direct():
    s = ShrinkPerturb(every=3, at_updates=[7, 2])
    assert [u for u in range(12) if s.due(u)] == [2, 3, 6, 7, 9]
    assert s.at_updates == (2, 7)
    none = NoReset()
    assert isinstance(none, ResetStrategy)
    assert not any(none.due(u) for u in range(10))
    assert none(object(), 3) is False
    assert ShrinkPerturb(every=2)(object(), 3) is False  # not due: the agent is not touched


# -- validation --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"groups": (), "every": 1}, "empty"),
    ({"groups": ("q", "value"), "every": 1}, "unknown group"),
    ({"groups": "q", "every": 1}, "sequence of group names"),
    ({"groups": ("q", "q"), "every": 1}, "twice"),
    ({}, "no schedule"),
    ({"at_updates": ()}, "no schedule"),
    ({"every": 0}, "every"),
    ({"every": -5}, "every"),
    ({"every": 2.5}, "every"),
    ({"at_updates": (3, -1)}, "at_updates"),
    ({"at_updates": (0,)}, "at_updates"),
    ({"at_updates": 5}, "at_updates"),
    ({"every": 1, "last_k": 0}, "last_k"),
    ({"every": 1, "last_k": -2}, "last_k"),
])
@pytest.mark.parametrize("cls", [ShrinkPerturb, FullReset])
def test_bad_schedule_and_groups_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"noise_std": -0.01}, "noise_std"), ({"noise_std": float("nan")}, "noise_std"),
])
def test_bad_shrink_perturb_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShrinkPerturb(every=10, **kwargs)


def test_bad_reset_raises_when_the_agent_is_built(tiny_agent_factory):
    with pytest.raises(ValueError, match="alpha"):
        tiny_agent_factory(SPEC, reset=functools.partial(ShrinkPerturb, every=3, alpha=2.0))


# -- state and registration --------------------------------------------------------------
def test_state_dict_round_trip(tiny_agent_factory):
    reset = functools.partial(ShrinkPerturb, every=2, groups=("q",))
    agent = tiny_agent_factory(SPEC, reset=reset)
    fired_at(agent, 5)
    state = roundtrip(agent.state_dict())
    assert state["reset"] == {"num_resets": 2, "last_reset_update": 4}
    resumed = tiny_agent_factory(SPEC, reset=reset)
    resumed.load_state_dict(state)
    assert resumed.reset_strategy.state_dict() == agent.reset_strategy.state_dict()
    assert resumed.num_updates == 5
    # Both continue identically: the same reset at update 6, the same parameters after it.
    for a in (agent, resumed):
        torch.manual_seed(3)
        assert fired_at(a, 1) == [6]
    for (k, p), (_, q) in zip(agent.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), k
    assert resumed.reset_strategy.num_resets == 3
    none = NoReset()
    none.load_state_dict(roundtrip(none.state_dict()))
    assert none.num_resets == 0


def test_registered():
    table = registered("resets")
    assert {"NoReset", "ShrinkPerturb", "FullReset"} <= set(table)
    assert table["ShrinkPerturb"] is ShrinkPerturb


def test_gin_builds_a_strategy():
    import gin

    gin.parse_config("""
        resets.ShrinkPerturb.every = 20             # updates
        resets.ShrinkPerturb.groups = ('q', 'policy')
        RESET = @resets.ShrinkPerturb
    """)
    strategy = gin.query_parameter("%RESET").scoped_configurable_fn()
    assert isinstance(strategy, ShrinkPerturb)
    assert (strategy.every, strategy.groups, strategy.alpha) == (20, ("q", "policy"), 0.8)
