"""Prediction heads of the world model (TD-MPC2, App. A): reward, Q ensemble, policy prior."""

from __future__ import annotations

import torch
import torch.nn as nn

from components.layers import EnsembleMLP, broadcast_pair, concat_mlp, init_weights, mlp, zero_last_linear
from rlcore import math as rmath
from rlcore.registry import register


@register("heads")
class DiscreteRegressionHead(nn.Module):
    """MLP [z, a] -> K logits of a two-hot distribution (the reward head).

    The output layer starts at zero, as in TD-MPC2.

    Shapes: z [..., L], a [..., A] -> [..., K].
    """

    def __init__(self, in_dim: int, num_bins: int, *, hidden_dim: int = 512, num_layers: int = 2):
        super().__init__()
        self.net = mlp(in_dim, [hidden_dim] * num_layers, max(num_bins, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh draw of this head's own init (used by resets)."""
        init_weights(self)
        zero_last_linear(self)

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Logits of cat([z, a]); z and a may differ in leading shape where they
        broadcast (see `layers.concat_mlp`)."""
        return concat_mlp(self.net, z, a)


@register("heads")
class EnsembleQHead(nn.Module):
    """An ensemble of Q MLPs [z, a] -> K logits, as one batched module.

    Dropout (0.01 by default) acts in each member's first layer; output layers start at
    zero. `members` selects which members to evaluate, so unused heads cost nothing.

    Shapes: z [..., L], a [..., A] -> [Q, ..., K] (or [m, ..., K] for m selected members).
    """

    def __init__(self, in_dim: int, num_bins: int, *, num_q: int = 5, hidden_dim: int = 512,
                 num_layers: int = 2, dropout: float = 0.01):
        super().__init__()
        if num_q < 2:
            raise ValueError(f"EnsembleQHead needs num_q >= 2 (TD-MPC2 uses 5), got {num_q}")
        self.num_q = num_q
        self.net = EnsembleMLP(num_q, in_dim, [hidden_dim] * num_layers, max(num_bins, 1),
                               dropout=dropout, zero_output=True)

    def reset_parameters(self) -> None:
        self.net.reset_parameters()

    def forward(self, z: torch.Tensor, a: torch.Tensor,
                members: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(torch.cat(broadcast_pair(z, a), -1), members)


@register("heads")
class TanhGaussianPolicyHead(nn.Module):
    """Policy prior: MLP z -> (mean, log-std); action = tanh(mean + std * eps).

    log-std is squashed into [log_std_min, log_std_max] as min + (max-min)/2 (tanh(x)+1).
    The entropy returned is TD-MPC2's "scaled entropy": the pre-squash Gaussian
    log-probability's negative, times the action dimension.

    Shapes: z [..., L] -> action [..., A] and a dict of [..., A] / [..., 1] tensors.
    """

    def __init__(self, latent_dim: int, action_dim: int, *, hidden_dim: int = 512,
                 num_layers: int = 2, log_std_min: float = -10.0, log_std_max: float = 2.0):
        super().__init__()
        self.action_dim = action_dim
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.net = mlp(latent_dim, [hidden_dim] * num_layers, 2 * action_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, z: torch.Tensor, *, deterministic: bool = False):
        mean, raw_log_std = self.net(z).chunk(2, dim=-1)  # [..., A] each
        log_std = rmath.log_std_squash(raw_log_std, self.log_std_min, self.log_std_max)
        eps = torch.zeros_like(mean) if deterministic else torch.randn_like(mean)
        log_prob = rmath.gaussian_logprob(eps, log_std)  # [..., 1]
        scaled_entropy = -log_prob * self.action_dim  # [..., 1]
        action = mean + eps * log_std.exp()
        mean, action, log_prob = rmath.squash(mean, action, log_prob)
        info = {"mean": mean, "log_std": log_std, "entropy": -log_prob,
                "scaled_entropy": scaled_entropy}
        return action, info


@register("heads")
class TerminationHead(nn.Module):
    """MLP z' -> 1 logit: does the transition into latent z' end the episode?

    Applied to the latent *after* the transition, in training and planning alike.

    Shapes: z [..., L] -> [..., 1] logits.
    """

    def __init__(self, latent_dim: int, *, hidden_dim: int = 512, num_layers: int = 2):
        super().__init__()
        self.net = mlp(latent_dim, [hidden_dim] * num_layers, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@register("heads")
class JointAuxQHead(nn.Module):
    """Auxiliary Q heads for G extra discounts with a shared trunk (multi-gamma, joint form).

    One MLP [z, a] -> hidden -> G*K logits; output layer zero-initialized like the Q heads.

    Shapes: z [..., L], a [..., A] -> [..., G, K].
    """

    def __init__(self, in_dim: int, num_bins: int, num_discounts: int, *, hidden_dim: int = 512,
                 num_layers: int = 2):
        super().__init__()
        self.num_discounts, self.num_bins = num_discounts, max(num_bins, 1)
        self.net = mlp(in_dim, [hidden_dim] * num_layers, num_discounts * self.num_bins)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        zero_last_linear(self)

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        out = concat_mlp(self.net, z, a)  # [..., G*K]
        return out.view(*out.shape[:-1], self.num_discounts, self.num_bins)  # [..., G, K]


@register("heads")
class SeparateAuxQHead(nn.Module):
    """Auxiliary Q heads for G extra discounts as G independent MLPs (separate form).

    Runs as one batched ensemble (no Python loop over heads).

    Shapes: z [..., L], a [..., A] -> [..., G, K].
    """

    def __init__(self, in_dim: int, num_bins: int, num_discounts: int, *, hidden_dim: int = 512,
                 num_layers: int = 2):
        super().__init__()
        self.num_discounts = num_discounts
        self.net = EnsembleMLP(num_discounts, in_dim, [hidden_dim] * num_layers,
                               max(num_bins, 1), zero_output=True)

    def reset_parameters(self) -> None:
        self.net.reset_parameters()

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat(broadcast_pair(z, a), -1))  # [G, ..., K]
        return torch.movedim(out, 0, -2)  # [..., G, K]
