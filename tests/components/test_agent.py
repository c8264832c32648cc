"""TDMPC2Agent: updates, determinism, checkpoint round trips, acting and the discount."""

from __future__ import annotations

import io

import pytest
import torch
from tensordict import TensorDict

from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec

D, A, T, B, E = 5, 2, 3, 8, 3
SPEC = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=500, num_envs=E)
PLANNERS = pytest.mark.parametrize("planner", ["mppi", "cem"])


def make_batch(seed: int = 0, T_: int = T, B_: int = B) -> TensorDict:
    """A replay batch [T+1, B] in the arrival convention: row 0 action/reward are NaN."""
    g = torch.Generator().manual_seed(seed)
    action = torch.rand(T_ + 1, B_, A, generator=g) * 2 - 1
    reward = torch.randn(T_ + 1, B_, generator=g)
    action[0] = float("nan")
    reward[0] = float("nan")
    terminated = torch.zeros(T_ + 1, B_, dtype=torch.bool)
    return TensorDict({
        OBS: torch.randn(T_ + 1, B_, D, generator=g),
        ACTION: action,
        REWARD: reward,
        TERMINATED: terminated,
    }, batch_size=[T_ + 1, B_])


def losses_of(out: TensorDict) -> dict[str, float]:
    return {k: out[k].item() for k in out.keys() if k.startswith("loss_")}


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------------------------------
def test_update_returns_finite_losses_and_moves_params(tiny_agent_factory):
    agent = tiny_agent_factory(SPEC)
    model = agent.model
    online_before = {k: v.clone() for k, v in model.state_dict().items()}
    target_before = [p.clone() for p in model._target_Qs.parameters()]
    out = agent.update(make_batch())
    assert isinstance(out, TensorDict)
    keys = set(out.keys())
    assert {"loss_consistency", "loss_reward", "loss_value", "loss_policy",
            "loss_total"} <= keys
    for k in keys:
        assert k.startswith("loss_") or k.startswith("stats/"), k
        assert out[k].shape == () and torch.isfinite(out[k]), k
        assert not out[k].requires_grad, k
    model_terms = sum(out[k] for k in ("loss_consistency", "loss_reward", "loss_value"))
    torch.testing.assert_close(out["loss_total"], model_terms)
    # Every trained group moved.
    after = model.state_dict()
    for group in ("encoder", "dynamics", "reward", "q", "policy"):
        prefix = {"encoder": "_encoder", "dynamics": "_dynamics", "reward": "_reward",
                  "q": "_Qs", "policy": "_pi"}[group]
        changed = [not torch.equal(after[k], online_before[k]) for k in after
                   if k.startswith(prefix + ".")]
        assert any(changed), group
    # The target moved by Polyak averaging with tau = 0.01: a small step towards online.
    for t_before, t_after, online in zip(target_before, model._target_Qs.parameters(),
                                         model._Qs.parameters()):
        torch.testing.assert_close(t_after, 0.99 * t_before + 0.01 * online)
    moved = [not torch.equal(a, b) for a, b in zip(target_before, model._target_Qs.parameters())]
    assert any(moved)
    assert not model.training  # back in eval mode for acting


def test_row_zero_is_never_read(tiny_agent_factory):
    """Row 0 action/reward are NaN (and a stray terminated flag): the update ignores them."""
    batch = make_batch()
    agent1 = tiny_agent_factory(SPEC)
    torch.manual_seed(0)
    agent2 = tiny_agent_factory(SPEC)
    batch2 = batch.clone()
    batch2[ACTION][0] = 123.0
    batch2[REWARD][0] = -77.0
    batch2[TERMINATED][0] = True
    torch.manual_seed(1)
    out1 = losses_of(agent1.update(batch))
    torch.manual_seed(1)
    out2 = losses_of(agent2.update(batch2))
    assert out1 == out2
    assert all(torch.isfinite(torch.tensor(v)) for v in out1.values())
    # A NaN in a row that *is* read gives NaN losses (which the runners refuse), not a
    # silent bin index.
    bad = make_batch()
    bad[REWARD][2, 0] = float("nan")
    out = agent1.update(bad)
    assert not torch.isfinite(out["loss_reward"]) and not torch.isfinite(out["loss_value"])


def test_same_seed_same_first_updates(tiny_agent_factory):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        agent = tiny_agent_factory(SPEC, num_q=3)
        runs.append([losses_of(agent.update(make_batch(seed=i))) for i in range(3)])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]


@PLANNERS
def test_state_dict_round_trip_gives_identical_actions(tiny_agent_factory, planner):
    torch.manual_seed(0)
    agent = tiny_agent_factory(SPEC, planner=planner)
    for i in range(2):
        agent.update(make_batch(seed=i))
    obs = torch.randn(E, D)
    agent.act(obs, torch.ones(E, dtype=torch.bool))  # fills the planner's warm start
    agent.act(obs, torch.ones(E, dtype=torch.bool), eval_mode=True)
    state = roundtrip(agent.state_dict())

    torch.manual_seed(1)  # a differently initialized agent
    fresh = tiny_agent_factory(SPEC, planner=planner)
    fresh.load_state_dict(state)
    for k, v in agent.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[k], v, rtol=0, atol=0)

    not_first = torch.zeros(E, dtype=torch.bool)
    for kwargs in ({}, {"eval_mode": True}, {"use_planner": False},
                   {"use_planner": False, "eval_mode": True}):
        torch.manual_seed(42)
        a1 = agent.act(obs, not_first, **kwargs)
        torch.manual_seed(42)
        a2 = fresh.act(obs, not_first, **kwargs)
        torch.testing.assert_close(a1, a2, rtol=0, atol=0, msg=f"act({kwargs})")

    # Optimizer moments and running scale came along: the next update is identical too.
    batch = make_batch(seed=5)
    torch.manual_seed(3)
    out1 = losses_of(agent.update(batch))
    torch.manual_seed(3)
    out2 = losses_of(fresh.update(batch))
    assert out1 == out2
    torch.testing.assert_close(agent.scale.value, fresh.scale.value)
    # ... and so are the parameters after the optimizer steps (Adam moments restored).
    for (k, v1), v2 in zip(agent.model.state_dict().items(), fresh.model.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=0, atol=0, msg=k)


@PLANNERS
@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("use_planner", [True, False])
def test_act_returns_cpu_actions(tiny_agent_factory, planner, eval_mode, use_planner):
    agent = tiny_agent_factory(SPEC, planner=planner)
    a = agent.act(torch.randn(E, D), torch.ones(E, dtype=torch.bool), eval_mode=eval_mode,
                  use_planner=use_planner)
    assert isinstance(a, torch.Tensor)
    assert a.device.type == "cpu"
    assert a.shape == (E, A)
    assert (a.abs() <= 1).all() and torch.isfinite(a).all()
    assert not a.requires_grad


def test_discount_from_episode_length(tiny_agent_factory):
    assert tiny_agent_factory(SPEC).discount == pytest.approx(0.99)
    short = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=20)
    assert tiny_agent_factory(short).discount == pytest.approx(0.95)
    agent = tiny_agent_factory(SPEC, discount=0.9)
    assert agent.discount == 0.9
    assert agent.planner.discount == 0.9  # the planner scores with the same gamma


@pytest.mark.parametrize("discount", [0.0, 1.0, 1.5, -0.3])
def test_invalid_discount_raises(tiny_agent_factory, discount):
    with pytest.raises(ValueError, match="discount"):
        tiny_agent_factory(SPEC, discount=discount)


def test_mpc_false_acts_with_the_policy(tiny_agent_factory, monkeypatch):
    agent = tiny_agent_factory(SPEC, mpc=False)

    def no_planning(*args, **kwargs):
        raise AssertionError("the planner must not be called when mpc=False")

    monkeypatch.setattr(agent.planner, "plan", no_planning)
    obs = torch.randn(E, D)
    a = agent.act(obs, torch.ones(E, dtype=torch.bool), eval_mode=True)
    with torch.no_grad():
        mean, _ = agent.model.pi(agent.model.encode(obs), deterministic=True)
    torch.testing.assert_close(a, mean)  # evaluation: the policy mean
    torch.manual_seed(8)
    a_train = agent.act(obs, torch.ones(E, dtype=torch.bool))
    torch.manual_seed(8)
    with torch.no_grad():
        sampled, _ = agent.model.pi(agent.model.encode(obs))
    torch.testing.assert_close(a_train, sampled)
    assert not torch.allclose(a_train, a)


def test_mpc_true_acts_with_the_planner(tiny_agent_factory, monkeypatch):
    agent = tiny_agent_factory(SPEC)
    calls = []
    real_step = agent.planner.step

    def spy(z, is_first, prev_mean, eval_mode):
        calls.append((z.shape, is_first.clone(), eval_mode))
        return real_step(z, is_first, prev_mean, eval_mode)

    monkeypatch.setattr(agent.planner, "step", spy)
    is_first = torch.tensor([True, False, True])
    agent.act(torch.randn(E, D), is_first, eval_mode=True)
    assert len(calls) == 1
    assert calls[0][0] == (E, 16) and calls[0][1].tolist() == is_first.tolist() and calls[0][2]
    agent.act(torch.randn(E, D), is_first, use_planner=False)
    assert len(calls) == 1


def test_optimizer_groups(tiny_agent_factory):
    agent = tiny_agent_factory(SPEC, lr=1e-3, enc_lr_scale=0.3)
    groups = agent.model.module_groups()
    enc_ids = {id(p) for p in groups["encoder"].parameters()}
    pg = agent.model_optim.param_groups
    assert {id(p) for p in pg[0]["params"]} == enc_ids
    assert pg[0]["lr"] == pytest.approx(3e-4)
    assert all(g["lr"] == pytest.approx(1e-3) for g in pg[1:])
    model_ids = {id(p) for g in pg for p in g["params"]}
    assert model_ids == {id(p) for p in agent.model.model_parameters()}
    target_ids = {id(p) for p in agent.model._target_Qs.parameters()}
    pi_ids = {id(p) for g in agent.pi_optim.param_groups for p in g["params"]}
    assert pi_ids == {id(p) for p in groups["policy"].parameters()}
    assert not (model_ids | pi_ids) & target_ids
    assert not model_ids & pi_ids
    assert agent.pi_optim.param_groups[0]["eps"] == pytest.approx(1e-5)
    assert agent.pi_optim.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_loaded_state_is_a_copy(tiny_agent_factory):
    """An agent loaded from another's state_dict shares no tensor with it: the other's
    later updates leave it unchanged (optimizer moments included)."""
    torch.manual_seed(0)
    a = tiny_agent_factory(SPEC)
    a.update(make_batch(seed=0))
    b = tiny_agent_factory(SPEC)
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in b.model_optim.state_dict()["state"][0].items()}
    a.update(make_batch(seed=1))
    after = b.model_optim.state_dict()["state"][0]
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed with the other agent's update"
