"""The TD-MPC2 agent: acting (planner or policy prior) and updates (Hansen et al., 2024).

The agent builds its collaborators from gin references with the values known at run
time (the EnvSpec, the discount, the device), sums the losses' `loss_*` terms, and owns
the optimizers and the running scale.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tensordict import TensorDict

from components.losses import RunningScale
from rlcore import math as rmath
from rlcore.registry import register
from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec


def _sum_losses(td: TensorDict) -> torch.Tensor:
    return sum(v for k, v in td.items() if k.startswith("loss_"))


@register("agents")
class TDMPC2Agent:
    """Model-based agent that plans in the latent space of a learned world model.

    Args:
        spec: the environment's EnvSpec.
        device: where the model lives (chosen once by the runner).
        world_model, planner, model_loss, policy_loss: gin references (classes).
        discount: gamma; None derives it from the episode length (SPEC §6).
        lr: Adam learning rate of model and policy; the encoder's is lr * enc_lr_scale.
        grad_clip_norm: gradient-norm clip for each optimizer.
        tau: Polyak rate of the target Q ensemble, after every value update.
        mpc: act with the planner (True) or the policy prior alone (False).

    Shapes: act(obs [E, *obs], is_first [E]) -> [E, A]; update(batch [T+1, B]).
    """

    def __init__(self, spec: EnvSpec, device: torch.device | str = "cpu", *,
                 world_model: Callable[..., Any], planner: Callable[..., Any],
                 model_loss: Callable[..., Any], policy_loss: Callable[..., Any],
                 discount: float | None = None, lr: float = 3e-4, enc_lr_scale: float = 0.3,
                 policy_eps: float = 1e-5, grad_clip_norm: float = 20.0, tau: float = 0.01,
                 scale_tau: float = 0.01, mpc: bool = True):
        self.spec = spec
        self.device = torch.device(device)
        if discount is None:
            discount = rmath.episode_discount(spec.episode_length)
        if not 0.0 < discount < 1.0:
            raise ValueError(f"TDMPC2Agent.discount must lie in (0, 1), got {discount}")
        self.discount = float(discount)
        self.model = world_model(spec).to(self.device)
        self.planner = planner(self.model, spec.action_dim, self.discount)
        self.model_loss = model_loss()
        self.policy_loss = policy_loss()
        self.grad_clip_norm, self.tau, self.mpc = grad_clip_norm, tau, mpc
        groups = self.model.module_groups()
        self.model_optim = torch.optim.Adam([
            {"params": groups["encoder"].parameters(), "lr": lr * enc_lr_scale},
            *({"params": m.parameters()} for name, m in groups.items()
              if name not in ("encoder", "policy")),
        ], lr=lr)
        self.pi_optim = torch.optim.Adam(groups["policy"].parameters(), lr=lr, eps=policy_eps)
        self.scale = RunningScale(scale_tau, device=self.device)
        self.model.eval()

    # -- acting -----------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, is_first: torch.Tensor, *, eval_mode: bool = False,
            use_planner: bool | None = None) -> torch.Tensor:
        """One action per env, on the CPU.  obs [E, *obs], is_first [E] -> [E, A]."""
        obs = obs.to(self.device, non_blocking=True)
        z = self.model.encode(obs)  # [E, L]
        if self.mpc if use_planner is None else use_planner:
            a = self.planner.plan(z, is_first.to(self.device), eval_mode=eval_mode)
        else:
            a, info = self.model.pi(z, deterministic=eval_mode)
        return a.cpu()

    # -- updates ----------------------------------------------------------------------
    def _rollout(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Latent rollout from z_0 = enc(o_0).  -> zs [T+1, B, L]."""
        z = self.model.encode(obs[0])  # [B, L]
        zs = [z]
        for t in range(action.shape[0]):
            z = self.model.next(z, action[t])
            zs.append(z)
        return torch.stack(zs)  # [T+1, B, L]

    def update(self, batch: TensorDict) -> TensorDict:
        """One full update (model, value, policy) from a replay batch [T+1, B].

        Arrival convention: batch rows 1..T hold the action and reward that led to obs_t,
        so actions, rewards and terminations are read from `[1:]`.
        """
        batch = batch.to(self.device)
        obs = batch[OBS]  # [T+1, B, *obs]
        action = batch[ACTION][1:]  # [T, B, A]
        reward = batch[REWARD][1:].unsqueeze(-1)  # [T, B, 1]
        terminated = batch[TERMINATED][1:].unsqueeze(-1).float()  # [T, B, 1]
        self.model.train()
        with torch.no_grad():
            next_z = self.model.encode(obs[1:])  # [T, B, L]
        # Model update
        zs = self._rollout(obs, action)  # [T+1, B, L]
        model_terms = self.model_loss(self.model, zs, next_z, action, reward, terminated,
                                      self.discount)
        model_total = _sum_losses(model_terms)
        self.model_optim.zero_grad(set_to_none=True)
        model_total.backward()
        model_grad = torch.nn.utils.clip_grad_norm_(self.model.model_parameters(),
                                                    self.grad_clip_norm)
        self.model_optim.step()
        # Policy update
        pi_terms = self.policy_loss(self.model, zs, self.scale)
        self.pi_optim.zero_grad(set_to_none=True)
        _sum_losses(pi_terms).backward()
        pi_grad = torch.nn.utils.clip_grad_norm_(self.model.module_groups()["policy"].parameters(),
                                                 self.grad_clip_norm)
        self.pi_optim.step()
        # Target update
        self.model.soft_update_target_Q(self.tau)
        self.model.eval()
        out = TensorDict({**model_terms.detach().to_dict(), **pi_terms.detach().to_dict(),
                          "loss_total": model_total.detach(),
                          "stats/grad_norm_model": model_grad.detach(),
                          "stats/grad_norm_policy": pi_grad.detach()}, batch_size=[])
        return out

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "model_optim": self.model_optim.state_dict(),
                "pi_optim": self.pi_optim.state_dict(), "scale": self.scale.state_dict(),
                "planner": self.planner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.model_optim.load_state_dict(state["model_optim"])
        self.pi_optim.load_state_dict(state["pi_optim"])
        self.scale.load_state_dict(state["scale"])
        self.planner.load_state_dict(state["planner"])
