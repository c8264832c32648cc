"""The TD-MPC2 world model: wires injected parts and exposes its verbs.

`encode / next / reward / pi / Q`, as in Hansen et al. (2024), §3. The model owns the
target copy of the Q ensemble (Polyak-averaged) and the two-hot bin settings shared by
the reward and value heads.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from rlcore import math as rmath
from rlcore.registry import register
from rlcore.types import EnvSpec


@register("models")
class WorldModel(nn.Module):
    """Encoder, latent dynamics, reward head, Q ensemble (+ target) and policy prior.

    Collaborators are classes (gin references); the model calls them with the values
    known only at run time (spec, latent and action dimensions, bin count).

    Shapes: obs [..., *obs] -> z [..., L]; (z, a [..., A]) -> z' [..., L], reward logits
    [..., K], Q logits [Q, ..., K]; pi(z) -> a [..., A].
    """

    def __init__(self, spec: EnvSpec, *, encoder: Callable[..., nn.Module],
                 dynamics: Callable[..., nn.Module], reward_head: Callable[..., nn.Module],
                 q_head: Callable[..., nn.Module], policy_head: Callable[..., nn.Module],
                 latent_dim: int = 512, num_bins: int = 101, vmin: float = -10.0,
                 vmax: float = 10.0):
        super().__init__()
        self.spec = spec
        self.latent_dim, self.action_dim = latent_dim, spec.action_dim
        self.num_bins, self.vmin, self.vmax = num_bins, vmin, vmax
        za = latent_dim + spec.action_dim
        self._encoder = encoder(spec, latent_dim)
        self._dynamics = dynamics(latent_dim, spec.action_dim)
        self._reward = reward_head(za, num_bins)
        self._Qs = q_head(za, num_bins)
        self._pi = policy_head(latent_dim, spec.action_dim)
        self.num_q = self._Qs.num_q
        self._target_Qs = copy.deepcopy(self._Qs).requires_grad_(False).train(False)

    # -- parameter groups -------------------------------------------------------------
    def module_groups(self) -> dict[str, nn.Module]:
        """Named module groups (optimizer groups, resets, gradient logging)."""
        return {"encoder": self._encoder, "dynamics": self._dynamics, "reward": self._reward,
                "q": self._Qs, "policy": self._pi}

    def model_parameters(self) -> list[nn.Parameter]:
        """Everything the model optimizer trains (all but the policy and targets)."""
        return [p for name, m in self.module_groups().items() if name != "policy"
                for p in m.parameters()]

    def train(self, mode: bool = True):
        super().train(mode)
        self._target_Qs.train(False)
        return self

    # -- verbs ------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self._encoder(obs)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._dynamics(z, a)

    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Reward logits [..., K]."""
        return self._reward(torch.cat([z, a], dim=-1))

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Two-hot logits [..., K] -> scalar [..., 1]."""
        return rmath.two_hot_inv(logits, self.num_bins, self.vmin, self.vmax)

    def pi(self, z: torch.Tensor, *, deterministic: bool = False):
        return self._pi(z, deterministic=deterministic)

    def Q(self, z: torch.Tensor, a: torch.Tensor, *, return_type: str = "min",
          target: bool = False, detach: bool = False) -> torch.Tensor:
        """Q-values from the ensemble.

        return_type `all`: logits of every member [Q, ..., K]. `min` / `avg`: the min or
        mean of two randomly chosen members' decoded values [..., 1]; only those two
        members are evaluated.
        """
        if return_type not in ("min", "avg", "all"):
            raise ValueError(f"return_type must be min, avg or all, got {return_type!r}")
        x = torch.cat([z, a], dim=-1)  # [..., L+A]
        net = self._target_Qs if target else self._Qs
        if return_type == "all":
            if detach:
                with torch.no_grad():
                    return net(x)
            return net(x)
        members = torch.randperm(self.num_q, device=x.device)[:2]
        if detach:
            params = {k: v.detach() for k, v in net.named_parameters()}
            logits = torch.func.functional_call(net, params, (x, members))  # [2, ..., K]
        else:
            logits = net(x, members)  # [2, ..., K]
        q1, q2 = self.decode(logits).unbind(0)  # [..., 1] each
        return torch.min(q1, q2) if return_type == "min" else (q1 + q2) / 2

    @torch.no_grad()
    def soft_update_target_Q(self, tau: float) -> None:
        rmath.polyak_(list(self._target_Qs.parameters()), list(self._Qs.parameters()), tau)

    @torch.no_grad()
    def sync_target_Q(self) -> None:
        for t, p in zip(self._target_Qs.parameters(), self._Qs.parameters()):
            t.copy_(p)
