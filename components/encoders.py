"""Observation encoders (TD-MPC2, App. A: state encoder)."""

from __future__ import annotations

import torch
import torch.nn as nn

from components.layers import SimNorm, init_weights, mlp
from rlcore.registry import register
from rlcore.types import EnvSpec


@register("encoders")
class MLPEncoder(nn.Module):
    """State encoder: MLP obs -> hidden (x num_layers-1) -> latent, LayerNorm + SimNorm out.

    Shapes: obs [..., D] -> z [..., L].
    """

    def __init__(self, spec: EnvSpec, latent_dim: int, *, hidden_dim: int = 256,
                 num_layers: int = 2, simnorm_dim: int = 8):
        super().__init__()
        if len(spec.obs_shape) != 1:
            raise ValueError(
                f"MLPEncoder needs flat state observations, got shape {spec.obs_shape}; "
                "use a pixel encoder for image observations"
            )
        self.net = mlp(spec.obs_shape[0], [hidden_dim] * max(num_layers - 1, 1), latent_dim,
                       out_act=SimNorm(simnorm_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh draw of this module's own init (used by resets)."""
        init_weights(self)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)
