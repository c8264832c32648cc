"""Cross-entropy method planning (a variant beside MPPI)."""

from __future__ import annotations

import torch

from components.planners.base import PopulationPlanner
from rlcore.registry import register


@register("planners")
class CEMPlanner(PopulationPlanner):
    """Cross-entropy planning in latent space.

    Refits a diagonal Gaussian to the elites with uniform weights (contrast MPPI's
    exponential weights), with optional momentum on the mean.

    Shapes: z [E, L] -> action [E, A]; candidate sequences [H, E, N, A].
    """

    def __init__(self, model, action_dim: int, discount: float, *, momentum: float = 0.0,
                 **kwargs):
        super().__init__(model, action_dim, discount, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"CEMPlanner.momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def _refit(self, elite_scores: torch.Tensor, elite_actions: torch.Tensor,
               mean: torch.Tensor):
        new_mean = elite_actions.mean(dim=2).transpose(0, 1)  # [H, E, A] -> [E, H, A]
        std = elite_actions.std(dim=2, unbiased=False).transpose(0, 1)  # [E, H, A]
        if self.momentum:
            new_mean = self.momentum * mean + (1 - self.momentum) * new_mean
        w = torch.full_like(elite_scores, 1.0 / elite_scores.shape[1])  # [E, K]
        return new_mean, std, w
