"""TD-MPC2 losses as separate, weighted components (Hansen et al., 2024, §3.1 and App. A).

Each loss returns a TensorDict of scalar `loss_*` terms with its coefficient already
applied, plus detached diagnostics under `stats/*`; the agent sums the `loss_*` keys.
Per-step terms are weighted by rho^t and averaged over the horizon: (1/T) sum_t rho^t l_t.

Inputs are time-major: latents zs [T+1, B, L] (rollout, zs[0] = enc(o_0)), next_z [T, B, L]
(encoded o_1..o_T, no gradient), action [T, B, A], reward [T, B, 1], terminated [T, B, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from rlcore import math as rmath
from rlcore.registry import register


def rho_weights(rho: float, T: int, device) -> torch.Tensor:
    """[T] weights rho^t / T, so that (w * l).sum() = (1/T) sum_t rho^t l_t."""
    return rho ** torch.arange(T, device=device, dtype=torch.float32) / T


class RunningScale:
    """Running scale S of Q estimates (TD-MPC2 §3.1), normalizing the policy loss.

    S <- lerp(S, max(P95 - P5, 1), tau) on each policy update, from S = 1.
    """

    def __init__(self, tau: float = 0.01, device=None):
        self.tau = tau
        self.value = torch.ones((), device=device)

    def update(self, x: torch.Tensor) -> None:
        q = torch.quantile(x.detach().flatten().float(),
                           torch.tensor([0.05, 0.95], device=x.device))
        self.value.lerp_(torch.clamp(q[1] - q[0], min=1.0), self.tau)

    def reset(self) -> None:
        self.value.fill_(1.0)

    def state_dict(self) -> dict:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])


@register("losses")
class WorldModelLoss:
    """Consistency, reward and value losses of TD-MPC2.

    consistency: MSE(z_hat_{t+1}, sg z_{t+1}), weight 20; reward: CE(two-hot r_t),
    weight 0.1; value: CE of each Q member against two-hot y_t, averaged over members,
    weight 0.1, where y_t = r_t + gamma (1 - d_t) min-of-2 Q_target(z_{t+1}, pi(z_{t+1})).
    """

    def __init__(self, *, consistency_coef: float = 20.0, reward_coef: float = 0.1,
                 value_coef: float = 0.1, rho: float = 0.5):
        self.consistency_coef = consistency_coef
        self.reward_coef, self.value_coef, self.rho = reward_coef, value_coef, rho

    pathways = ("full", "actor_critic")

    @torch.no_grad()
    def td_target(self, model, next_z: torch.Tensor, reward: torch.Tensor,
                  terminated: torch.Tensor, discount: float) -> torch.Tensor:
        """y_t [T, B, 1]; a' comes from the acting policy (the EMA one when enabled)."""
        a, _ = model.pi(next_z, target=True)  # [T, B, A]
        q = model.Q(next_z, a, return_type="min", target=True)  # [T, B, 1]
        return reward + discount * (1 - terminated.float()) * q

    def __call__(self, model, zs: torch.Tensor, next_z: torch.Tensor, action: torch.Tensor,
                 reward: torch.Tensor, terminated: torch.Tensor, discount: float, *,
                 value_only: bool = False) -> TensorDict:
        """All three terms; `value_only` (actor-critic updates) gives only the value term."""
        T = action.shape[0]
        w = rho_weights(self.rho, T, zs.device)  # [T]
        nb, lo, hi = model.num_bins, model.vmin, model.vmax
        # Value
        y = self.td_target(model, next_z, reward, terminated, discount)  # [T, B, 1]
        q_logits = model.Q(zs[:-1], action, return_type="all")  # [Q, T, B, K]
        val = rmath.soft_ce(q_logits, y.unsqueeze(0).expand(q_logits.shape[0], -1, -1, -1),
                            nb, lo, hi).mean(dim=(0, 2, 3))  # [T]
        out = {"loss_value": self.value_coef * (w * val).sum(),
               "stats/td_target_mean": y.mean(), "stats/td_target_std": y.std()}
        if not value_only:
            # Consistency
            cons = F.mse_loss(zs[1:], next_z, reduction="none").mean(dim=(1, 2))  # [T]
            # Reward
            rew_logits = model.reward(zs[:-1], action)  # [T, B, K]
            rew = rmath.soft_ce(rew_logits, reward, nb, lo, hi).mean(dim=(1, 2))  # [T]
            out["loss_consistency"] = self.consistency_coef * (w * cons).sum()
            out["loss_reward"] = self.reward_coef * (w * rew).sum()
        return TensorDict(out, batch_size=[])


@register("losses")
class AuxValueLoss:
    """Multi-gamma auxiliary value loss (variant, SPEC §3).

    y_g = r_t + gamma_g (1 - d_t) Q_aux_target,g(z_{t+1}, a'), a' ~ pi(z_{t+1}); loss is the
    mean over g of (1/T) sum_t rho^t CE(two-hot(y_g)), weight 0.1. The planner, the policy
    loss and the primary TD target never read the auxiliary heads; this loss's gradient
    does reach the shared encoder and dynamics, which is how it shapes the latent.
    """

    pathways = ("full", "actor_critic")

    def __init__(self, *, coef: float = 0.1, rho: float = 0.5):
        self.coef, self.rho = coef, rho

    def __call__(self, model, zs: torch.Tensor, next_z: torch.Tensor, action: torch.Tensor,
                 reward: torch.Tensor, terminated: torch.Tensor, discount: float) -> TensorDict:
        if model.aux_discounts.numel() == 0:
            return TensorDict({}, batch_size=[])
        T = action.shape[0]
        w = rho_weights(self.rho, T, zs.device)  # [T]
        gammas = model.aux_discounts  # [G]
        with torch.no_grad():
            a, _ = model.pi(next_z, target=True)  # [T, B, A]
            q_next = model.decode(model.aux_Q(next_z, a, target=True))  # [T, B, G, 1]
            y = reward.unsqueeze(-2) + gammas.view(-1, 1) * (
                1 - terminated.float()).unsqueeze(-2) * q_next  # [T, B, G, 1]
        logits = model.aux_Q(zs[:-1], action)  # [T, B, G, K]
        ce = rmath.soft_ce(logits, y, model.num_bins, model.vmin, model.vmax)  # [T, B, G, 1]
        per_t = ce.mean(dim=(1, 2, 3))  # [T]
        out = {"loss_aux_value": self.coef * (w * per_t).sum()}
        for g, gamma in enumerate(model.aux_discount_values):
            out[f"stats/aux_td_target_mean/gamma_{gamma:g}"] = y[..., g, :].mean()
        return TensorDict(out, batch_size=[])


@register("losses")
class TerminationLoss:
    """BCE-with-logits of the termination head on post-transition latents (episodic tasks).

    The paper's mean over the horizon and the batch of BCE(term(z_hat_{t+1}), d_t), weight
    1; with `rho_weighted`, (1/T) sum_t rho^t BCE_t like the other model losses.
    """

    pathways = ("full",)

    def __init__(self, *, coef: float = 1.0, rho: float = 0.5, rho_weighted: bool = False):
        self.coef, self.rho, self.rho_weighted = coef, rho, rho_weighted

    def __call__(self, model, zs: torch.Tensor, next_z: torch.Tensor, action: torch.Tensor,
                 reward: torch.Tensor, terminated: torch.Tensor, discount: float) -> TensorDict:
        if not model.episodic:
            return TensorDict({}, batch_size=[])
        T = action.shape[0]
        w = (rho_weights(self.rho, T, zs.device) if self.rho_weighted
             else torch.full((T,), 1.0 / T, device=zs.device))  # [T]
        logits = model.termination(zs[1:], logits=True)  # [T, B, 1]
        bce = F.binary_cross_entropy_with_logits(logits, terminated.float(),
                                                 reduction="none").mean(dim=(1, 2))  # [T]
        return TensorDict({"loss_termination": self.coef * (w * bce).sum()}, batch_size=[])


@register("losses")
class PolicyLoss:
    """TD-MPC2's policy objective on detached rollout latents.

    L_pi = mean_t rho^t * mean_B -(Q(z_t, pi(z_t)) / S + alpha * scaled_entropy), with Q the
    mean of two online members taken without gradient into the critic, S the running scale.
    """

    def __init__(self, *, entropy_coef: float = 1e-4, rho: float = 0.5):
        self.entropy_coef, self.rho = entropy_coef, rho

    def __call__(self, model, zs: torch.Tensor, scale: RunningScale, *,
                 update_scale: bool = True) -> TensorDict:
        zs = zs.detach()  # [T+1, B, L]
        a, info = model.pi(zs)  # [T+1, B, A]
        q = model.Q(zs, a, return_type="avg", detach=True)  # [T+1, B, 1]
        if update_scale:
            scale.update(q[0])
        q = q / scale.value
        rho = self.rho ** torch.arange(zs.shape[0], device=zs.device, dtype=torch.float32)
        per_t = -(self.entropy_coef * info["scaled_entropy"] + q).mean(dim=(1, 2))  # [T+1]
        return TensorDict({
            "loss_policy": (rho * per_t).mean(),
            "stats/policy_entropy": info["entropy"].mean(),
            "stats/policy_scaled_entropy": info["scaled_entropy"].mean(),
            "stats/policy_std": info["log_std"].exp().mean(),
            "stats/running_scale": scale.value.clone(),
        }, batch_size=[])
