"""Latent dynamics (TD-MPC2, App. A)."""

from __future__ import annotations

import torch
import torch.nn as nn

from components.layers import SimNorm, concat_mlp, init_weights, mlp
from rlcore.registry import register


@register("dynamics")
class MLPDynamics(nn.Module):
    """Predicts the next latent from [z, a]; SimNorm output.

    Shapes: z [..., L], a [..., A] -> z' [..., L]; z and a may differ in leading shape
    where they broadcast (one latent for many actions).
    """

    def __init__(self, latent_dim: int, action_dim: int, *, hidden_dim: int = 512,
                 num_layers: int = 2, simnorm_dim: int = 8):
        super().__init__()
        self.net = mlp(latent_dim + action_dim, [hidden_dim] * num_layers, latent_dim,
                       out_act=SimNorm(simnorm_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh draw of this module's own init (used by resets)."""
        init_weights(self)

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return concat_mlp(self.net, z, a)  # [..., L+A] -> [..., L]
