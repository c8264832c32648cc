"""Pure tensor functions used by the TD-MPC2 family (Hansen et al., 2024, §3 and App. A).

Bin settings are arguments, never a config object.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * ln(1 + |x|)."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `symlog`: sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def bin_centres(num_bins: int, vmin: float, vmax: float, device=None) -> torch.Tensor:
    """The K-bin grid in symlog space.  Shapes: [K]."""
    return torch.linspace(vmin, vmax, num_bins, device=device)


def two_hot(x: torch.Tensor, num_bins: int, vmin: float, vmax: float) -> torch.Tensor:
    """Two-hot encoding of scalars in symlog space.

    The target symlog(x), clipped to [vmin, vmax], is split between its two neighbouring
    bins in proportion to its distance to each. A NaN target gives a NaN encoding (and a
    NaN loss, which the runners reject naming the loss term): checking here would force a
    host sync in every update.

    Shapes: x [...] -> [..., K].
    """
    if num_bins <= 1:
        return symlog(x).unsqueeze(-1)
    bin_size = (vmax - vmin) / (num_bins - 1)
    y = symlog(x).clamp(vmin, vmax)  # [...]
    nan = torch.isnan(y)  # [...] (no host sync: NaN rows are filled at the end)
    y = torch.where(nan, torch.zeros_like(y), y)
    pos = (y - vmin) / bin_size  # [...] fractional bin index
    lo = pos.floor().clamp(0, num_bins - 1)  # [...]
    frac = pos - lo  # [...]
    lo = lo.long()
    hi = (lo + 1).clamp(max=num_bins - 1)
    out = torch.zeros(*x.shape, num_bins, device=x.device, dtype=x.dtype)  # [..., K]
    out.scatter_add_(-1, lo.unsqueeze(-1), (1 - frac).unsqueeze(-1))
    out.scatter_add_(-1, hi.unsqueeze(-1), frac.unsqueeze(-1))
    return out.masked_fill(nan.unsqueeze(-1), float("nan"))


def two_hot_inv(logits: torch.Tensor, num_bins: int, vmin: float, vmax: float) -> torch.Tensor:
    """Decode logits to a scalar: symexp of the softmax-weighted bin centres.

    Shapes: logits [..., K] -> [..., 1].
    """
    if num_bins <= 1:
        return symexp(logits)
    probs = F.softmax(logits, dim=-1)  # [..., K]
    centres = bin_centres(num_bins, vmin, vmax, device=logits.device).to(logits.dtype)  # [K]
    return symexp((probs * centres).sum(-1, keepdim=True))


def soft_ce(logits: torch.Tensor, target: torch.Tensor, num_bins: int, vmin: float,
            vmax: float) -> torch.Tensor:
    """Cross-entropy between predicted logits and the two-hot encoding of scalar targets.

    Shapes: logits [..., K], target [..., 1] or [...] -> [..., 1].
    """
    if target.shape == logits.shape[:-1] + (1,):
        target = target.squeeze(-1)
    log_pred = F.log_softmax(logits, dim=-1)  # [..., K]
    tgt = two_hot(target, num_bins, vmin, vmax)  # [..., K]
    return -(tgt * log_pred).sum(-1, keepdim=True)  # [..., 1]


def gaussian_logprob(eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Log-probability of standard-normal noise `eps` scaled by exp(log_std), summed.

    Shapes: [..., A] -> [..., 1].
    """
    residual = -0.5 * eps.pow(2) - log_std
    return residual.sum(-1, keepdim=True) - 0.5 * math.log(2 * math.pi) * eps.size(-1)


def squash(mu: torch.Tensor, pi: torch.Tensor, log_pi: torch.Tensor):
    """Tanh-squash a Gaussian sample and correct its log-probability."""
    mu = torch.tanh(mu)
    pi = torch.tanh(pi)
    log_pi = log_pi - torch.log(F.relu(1 - pi.pow(2)) + 1e-6).sum(-1, keepdim=True)
    return mu, pi, log_pi


def log_std_squash(x: torch.Tensor, low: float = -10.0, high: float = 2.0) -> torch.Tensor:
    """Map raw outputs into [low, high] as low + (high-low)/2 * (tanh(x) + 1)."""
    return low + 0.5 * (high - low) * (torch.tanh(x) + 1)


def episode_discount(episode_length: int, *, low: float = 0.95, high: float = 0.995) -> float:
    """TD-MPC2's heuristic discount from the episode length in agent steps.

    clip((L/5 - 1) / (L/5), low, high); 0.99 for DMC's 500-step episodes.
    """
    frac = episode_length / 5
    return float(min(max((frac - 1) / frac, low), high))


@torch.no_grad()
def polyak_(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    """In place: target <- (1 - tau) * target + tau * online."""
    torch._foreach_lerp_(target, online, tau)
