"""MPPI planning (TD-MPC2, §3.2): exponentially weighted elite refits."""

from __future__ import annotations

import torch

from components.planners.base import PopulationPlanner
from rlcore.registry import register


@register("planners")
class MPPIPlanner(PopulationPlanner):
    """Model predictive path integral planning in latent space.

    Elite weights are exp(temperature * (score - max score)); mean and std are the
    weighted mean and std of the elites.

    Shapes: z [E, L] -> action [E, A]; candidate sequences [H, E, N, A].
    """

    def __init__(self, model, action_dim: int, discount: float, *, temperature: float = 0.5,
                 **kwargs):
        super().__init__(model, action_dim, discount, **kwargs)
        self.temperature = temperature

    def _refit(self, elite_scores: torch.Tensor, elite_actions: torch.Tensor,
               mean: torch.Tensor):
        max_score = elite_scores.max(dim=1, keepdim=True).values  # [E, 1]
        w = torch.exp(self.temperature * (elite_scores - max_score))  # [E, K]
        w = w / (w.sum(dim=1, keepdim=True) + 1e-9)
        wk = w.t().view(1, *w.t().shape, 1)  # [1, K, E, 1]
        acts = elite_actions.transpose(1, 2)  # [H, K, E, A]
        new_mean = (wk * acts).sum(1)  # [H, E, A]
        std = ((wk * (acts - new_mean.unsqueeze(1)) ** 2).sum(1)).sqrt()  # [H, E, A]
        return new_mean.transpose(0, 1), std.transpose(0, 1), w  # [E, H, A] x2, [E, K]
