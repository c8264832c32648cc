"""Observation encoders (TD-MPC2, App. A: state encoder)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-shift augmentation: replicate-pad by `pad`, crop back at a random offset.

    DrQ-v2's augmentation (Yarats et al., 2021, "Mastering Visual Continuous Control"),
    as TD-MPC2's `ShiftAug`: an independent integer shift in [-pad, pad] per image and
    axis. Crops are exact gathers (DrQ-v2's grid_sample lands on pixel centres too).

    Shapes: x [N, C, H, W] float -> [N, C, H, W].
    """
    N, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # [N, C, H+2p, W+2p]
    shift = torch.randint(0, 2 * pad + 1, (2, N, 1), device=x.device)  # [2, N, 1]
    rows = shift[0] + torch.arange(H, device=x.device)  # [N, H]
    cols = shift[1] + torch.arange(W, device=x.device)  # [N, W]
    x = padded.gather(2, rows[:, None, :, None].expand(N, C, H, W + 2 * pad))  # [N, C, H, W+2p]
    return x.gather(3, cols[:, None, None, :].expand(N, C, H, W))  # [N, C, H, W]


@register("encoders")
class ConvEncoder(nn.Module):
    """Pixel encoder: random shift, 4 convolutions with ReLU, Linear to latent, SimNorm.

    TD-MPC2's `rgb` encoder (Hansen et al., 2024, App. A; `common/layers.py:conv`):
    uint8 frames scaled to [-0.5, 0.5], conv 7x7/2, 5x5/2, 3x3/2, 3x3/1 with
    `num_channels` channels (64 x 64 -> 29 -> 13 -> 6 -> 4). The official encoder feeds the
    flattened last conv (32 * 4 * 4 = 512, its latent size) straight into SimNorm; here a
    ReLU follows the last conv too and a Linear maps to any `latent_dim`. Random shifts
    (pad `random_shift_pad`, 0 disables) apply in training mode only (the official applies
    them always), so acting and evaluation see the frames as rendered. Conv layers keep
    PyTorch's default init (as the official `weight_init`), the Linear TD-MPC2's.

    Args:
        spec: `obs_shape` (C, H, W), e.g. (9, 64, 64) for 3 stacked RGB frames.
        latent_dim: L, a multiple of `simnorm_dim`.

    Shapes: obs [..., C, H, W] uint8 (or float on the same 0..255 scale) -> z [..., L].
    """

    def __init__(self, spec: EnvSpec, latent_dim: int, *, num_channels: int = 32,
                 simnorm_dim: int = 8, random_shift_pad: int = 4):
        super().__init__()
        if len(spec.obs_shape) != 3:
            raise ValueError(
                f"ConvEncoder needs image observations [C, H, W], got shape {spec.obs_shape}; "
                "use encoders.MLPEncoder for state observations, or render pixels with "
                "DMControlVecEnv.obs_type = 'pixels'"
            )
        if latent_dim % simnorm_dim:
            raise ValueError(f"ConvEncoder latent_dim {latent_dim} must be a multiple of "
                             f"simnorm_dim {simnorm_dim}")
        if random_shift_pad < 0:
            raise ValueError(f"random_shift_pad must be >= 0, got {random_shift_pad}")
        self.obs_shape = tuple(spec.obs_shape)
        self.random_shift_pad = random_shift_pad
        C, H, W = self.obs_shape
        layers: list[nn.Module] = []
        sizes = [H, W]
        in_ch = C
        for kernel, stride in ((7, 2), (5, 2), (3, 2), (3, 1)):
            layers += [nn.Conv2d(in_ch, num_channels, kernel, stride=stride), nn.ReLU()]
            sizes = [(s - kernel) // stride + 1 for s in sizes]
            in_ch = num_channels
        if min(sizes) < 1:
            raise ValueError(f"ConvEncoder needs images of at least 39 x 39 pixels, got "
                             f"{H} x {W}; raise DMControlVecEnv.image_size (TD-MPC2: 64)")
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self.out = nn.Linear(num_channels * sizes[0] * sizes[1], latent_dim)
        self.simnorm = SimNorm(simnorm_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh draw of this module's own init (used by resets)."""
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()  # PyTorch's default, as TD-MPC2
        init_weights(self)  # the Linear: truncated normal (std 0.02), zero bias

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if tuple(obs.shape[-3:]) != self.obs_shape:
            raise ValueError(f"ConvEncoder expected observations [..., {self.obs_shape}], got "
                             f"{tuple(obs.shape)}")
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *self.obs_shape).float()  # [N, C, H, W], N = prod(lead)
        if self.training and self.random_shift_pad:
            x = random_shift(x, self.random_shift_pad)  # [N, C, H, W]
        x = x / 255.0 - 0.5
        z = self.simnorm(self.out(self.convs(x)))  # [N, L]
        return z.reshape(*lead, z.shape[-1])  # [..., L]
