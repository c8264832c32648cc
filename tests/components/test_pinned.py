"""Pinned numbers: one update and three plans per agent variant, as computed at 9528b09.

`tests/fixtures/pinned.pt` holds, for the paper's agent and each variant part, tiny
fixed weights (a state dict), a fixed replay batch and observations, and what the code at
commit 9528b09 computed from them (with `components.layers.reference_kernels()`, the
plain PyTorch ops): every loss and statistic `agent.update(batch)` returns, per-row
gradient norms of every stepped parameter (read at each optimizer step), the whole
`model.state_dict()` after the update, and for E = 2 envs the actions, the planner's
`state_dict()` (warm-start means) and `last_stats` (compared while the planner has them)
after `act` twice in training mode (the second call warm-started for env 0, reset for
env 1) and once in eval mode. Cases: the paper's agent and one agent per variant part
(`CASES`); the update and the planning calls each start from their own seed.

The test rebuilds each agent through the public constructors, loads the weights, seeds
torch and runs the same calls; every number must agree within 1e-5 (absolute and
relative). Random draws are the ones torch makes from the seed (`torch.randn`,
`randn_like`, `randperm`, `multinomial`, the dropout masks `F.dropout` draws), so a
reimplementation passes only if it draws the same things in the same order.

The fixture was written by `tests/fixtures/make_pinned.py` of commit ad0ea1c (`git show
ad0ea1c:tests/fixtures/make_pinned.py`), run at 9528b09; a failure means the numbers
changed. Three rules changed on purpose after
9528b09 to follow the paper (sampling an elite in evaluation, cutting a planned trajectory
at P(end) > 0.5, a plain-mean termination loss); the agents here bind the earlier rules
(`deterministic_eval`, `soft_termination`, `TerminationLoss.rho_weighted`), so the fixture
still pins everything else.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict


from components.agent import TDMPC2Agent
from components.dynamics import MLPDynamics
from components.encoders import MLPEncoder
from components.heads import (DiscreteRegressionHead, EnsembleQHead, JointAuxQHead,
                              SeparateAuxQHead, TanhGaussianPolicyHead, TerminationHead)
from components.losses import AuxValueLoss, PolicyLoss, TerminationLoss, WorldModelLoss
from components.planners.cem import CEMPlanner
from components.planners.mppi import MPPIPlanner
from components.resets import ShrinkPerturb
from components.world_model import WorldModel
from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec
from tests.conftest import stepped_gradients

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pinned.pt"
ATOL = RTOL = 1e-5

# Tiny sizes: obs 5, action 2, latent 16 (two SimNorm groups), hidden 32, 21 bins, five Q
# members (so that min / avg draw two of them), horizon 3, batch 8, two envs.
D, A, L, H, K, NUM_Q, T, B, E = 5, 2, 16, 32, 21, 5, 3, 8, 2
PLANNER = dict(horizon=T, num_samples=32, num_pi_trajs=4, num_elites=8, iterations=3,
               deterministic_eval=True, soft_termination=True)  # the rules of 9528b09

# name -> how the agent differs from the paper's (MPPI, no auxiliary heads, full update)
CASES: dict[str, dict] = {
    "paper": {},
    "aux_joint": {"model": {"aux_q_head": JointAuxQHead, "aux_discounts": (0.9, 0.95)}},
    "aux_separate": {"model": {"aux_q_head": SeparateAuxQHead,
                               "aux_discounts": (0.9, 0.95)}},
    "episodic": {"episodic": True},
    "ema_policy": {"model": {"policy_ema_tau": 0.05}},
    "ema_encoder": {"model": {"encoder_ema_tau": 0.05}},
    "cem": {"planner": CEMPlanner},
    "actor_critic": {"model": {"aux_q_head": JointAuxQHead, "aux_discounts": (0.9, 0.95)},
                     "pathway": "actor_critic"},
    "policy_pathway": {"model": {"policy_ema_tau": 0.05}, "pathway": "policy"},
    # interpolation towards a fresh init after update 1: also pins the draws of the
    # modules' `reset_parameters()` (gin/ablations/resets/shrink_perturb.gin, due at once)
    "shrink_perturb": {"reset": functools.partial(ShrinkPerturb, at_updates=(1,),
                                                  alpha=0.8)},
}
UPDATE_SEED, PLAN_SEED = 1000, 2000  # + the case's index


def build_agent(name: str) -> TDMPC2Agent:
    """The case's agent (weights from its own init; the fixture's are loaded after)."""
    case = CASES[name]
    spec = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=500, num_envs=E,
                   episodic=case.get("episodic", False))
    world_model = functools.partial(
        WorldModel,
        encoder=functools.partial(MLPEncoder, hidden_dim=H, num_layers=2),
        dynamics=functools.partial(MLPDynamics, hidden_dim=H),
        reward_head=functools.partial(DiscreteRegressionHead, hidden_dim=H),
        q_head=functools.partial(EnsembleQHead, hidden_dim=H, num_q=NUM_Q, dropout=0.01),
        policy_head=functools.partial(TanhGaussianPolicyHead, hidden_dim=H),
        termination_head=functools.partial(TerminationHead, hidden_dim=H),
        latent_dim=L, num_bins=K,
        **{k: (functools.partial(v, hidden_dim=H) if k == "aux_q_head" else v)
           for k, v in case.get("model", {}).items()})
    planner = functools.partial(case.get("planner", MPPIPlanner), **PLANNER)
    return TDMPC2Agent(spec, "cpu", world_model=world_model, planner=planner,
                       model_loss=WorldModelLoss, policy_loss=PolicyLoss,
                       extra_losses=[AuxValueLoss,
                                     functools.partial(TerminationLoss, rho_weighted=True)],
                       reset=case.get("reset"))


def to_batch(batch: dict[str, torch.Tensor]) -> TensorDict:
    """The stored batch as a replay sample [T+1, B] (arrival convention: row 0 NaN)."""
    b = {OBS: batch["obs"], ACTION: batch["action"], REWARD: batch["reward"],
         TERMINATED: batch["terminated"]}
    return TensorDict({k: v.clone() for k, v in b.items()}, batch_size=[T + 1, B])


def gradient_norms(stepped) -> dict[str, torch.Tensor]:
    """name -> per-row L2 norms of the gradient (rows: first dimension; the whole tensor
    for vectors) of every parameter an optimizer step updated, read before the step
    (after clipping, which these tiny norms never trigger); zeros for a None gradient."""
    out = {}
    for name, (p, g) in stepped.items():
        g = torch.zeros_like(p) if g is None else g
        out[name] = g.flatten(1).norm(dim=1) if g.dim() > 1 else g.norm().reshape(1)
    return out


def _flatten(prefix: str, value, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif torch.is_tensor(value):
        out[prefix] = value.detach().clone()
    else:
        out[prefix] = torch.as_tensor(value)


def run_case(name: str, init_state: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
             obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything pinned for one case, as a flat name -> tensor dict."""
    index = list(CASES).index(name)
    agent = build_agent(name)
    agent.model.load_state_dict(init_state)
    out: dict[str, torch.Tensor] = {}
    # One update
    torch.manual_seed(UPDATE_SEED + index)
    with stepped_gradients(agent.model) as stepped:
        result = agent.update(to_batch(batch), pathway=CASES[name].get("pathway", "full"))
    norms = gradient_norms(stepped)
    for k in result.keys():
        out[f"update/{k}"] = result[k].detach().clone()
    for k, v in norms.items():
        out[f"grad_norm/{k}"] = v.clone()
    for k, v in agent.model.state_dict().items():
        out[f"param/{k}"] = v.detach().clone()
    # Planning: two training calls (the second warm-started for env 0), one evaluation call
    torch.manual_seed(PLAN_SEED + index)
    calls = (("train0", obs["train0"], [True, True], False),
             ("train1", obs["train1"], [False, True], False),
             ("eval", obs["eval"], [True, True], True))
    for key, o, is_first, eval_mode in calls:
        action = agent.act(o.clone(), torch.tensor(is_first), eval_mode=eval_mode)
        out[f"act/{key}/action"] = action.detach().clone()
        _flatten(f"act/{key}/planner", agent.planner.state_dict(), out)
        _flatten(f"act/{key}/stats", getattr(agent.planner, "last_stats", {}), out)
    return out


@functools.lru_cache(maxsize=1)
def _fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
            atol: float = ATOL, rtol: float = RTOL) -> list[str]:
    """Mismatches (missing keys, shapes, values beyond atol + rtol * |expected|)."""
    failures = []
    for key, exp in expected.items():
        if key not in actual:
            failures.append(f"{key}: missing")
            continue
        act = actual[key]
        if act.shape != exp.shape:
            failures.append(f"{key}: shape {tuple(act.shape)} vs {tuple(exp.shape)}")
            continue
        if not exp.is_floating_point():
            if not torch.equal(act.to(exp.dtype), exp):
                failures.append(f"{key}: {act.tolist()} vs {exp.tolist()}")
            continue
        act, exp = act.double(), exp.double()
        diff = (act - exp).abs()
        bad = ~(diff <= atol + rtol * exp.abs())  # NaN counts as bad
        bad &= ~(act.isnan() & exp.isnan())
        if bool(bad.any()):
            failures.append(f"{key}: max |diff| {float(diff.nan_to_num(float('inf')).max()):.3g}"
                            f" ({int(bad.sum())} of {bad.numel()} elements)")
    return failures


def test_fixture_covers_every_case():
    data = _fixture()
    assert list(data["cases"]) == list(CASES)
    assert data["meta"]["commit"] == "9528b09"


@pytest.mark.parametrize("name", list(CASES))
def test_pinned(name):
    """One update and three plans give the numbers recorded at 9528b09."""
    data = _fixture()
    case = data["cases"][name]
    actual = run_case(name, case["init_state"], data["batch"][case["batch"]], data["obs"])
    expected = case["expected"]
    if not any(k.startswith("act/train0/stats/") for k in actual):  # no `last_stats`
        expected = {k: v for k, v in expected.items()
                    if not (k.startswith("act/") and "/stats/" in k)}
    failures = compare(actual, expected)
    if failures:
        raise AssertionError(f"{name}: {len(failures)} pinned quantities changed:\n  "
                             + "\n  ".join(failures))
