"""Population-based planning in latent space, batched over environments.

`PopulationPlanner` does everything MPPI and CEM share (TD-MPC2, §3.2 and App. A): policy
prior candidates, Gaussian candidates around a per-env warm-started mean, scoring by
model rollouts plus a terminal value, elite selection, and action selection. Subclasses
override only `_refit`, the distribution update (the split used by mbrl-lib's
trajectory optimizers).

Shapes: z [E, L], is_first [E] -> action [E, A]; candidates [H, E, N, A]; scores [E, N];
warm-start mean [E, H, A].
"""

from __future__ import annotations

from typing import Any

import torch
import torch._dynamo

from rlcore import checks


class PopulationPlanner:
    """Shared sampling, scoring, warm start and action selection.

    Args:
        model: the world model (verbs `next`, `reward`, `decode`, `pi`, `Q`).
        action_dim: A.
        discount: gamma used to score sequences.
        horizon: H, planning horizon.
        num_samples: N, candidate sequences per env (policy ones included).
        num_pi_trajs: candidates obtained by rolling out the policy prior.
        num_elites: elites kept per iteration.
        iterations: refinement iterations (`iterations_large_action` when A >= 20).
        min_std, max_std: std clip; the std starts at max_std.
        deterministic_eval: in evaluation take the best elite's first action instead of
            sampling an elite with the refit's weights (the paper samples in evaluation
            too; evaluation adds no action noise either way).
        soft_termination: episodic models weight step t by the predicted probability of
            not having terminated before it, instead of the paper's rule: a trajectory
            is cut from the first step whose termination probability exceeds 0.5.
    """

    def __init__(self, model, action_dim: int, discount: float, *, horizon: int = 3,
                 num_samples: int = 512, num_pi_trajs: int = 24, num_elites: int = 64,
                 iterations: int = 6, iterations_large_action: int = 8,
                 min_std: float = 0.05, max_std: float = 2.0, deterministic_eval: bool = False,
                 soft_termination: bool = False):
        owner = type(self).__name__
        for name, value, least in (("horizon", horizon, 1), ("num_samples", num_samples, 1),
                                   ("num_pi_trajs", num_pi_trajs, 0),
                                   ("num_elites", num_elites, 1), ("iterations", iterations, 1),
                                   ("iterations_large_action", iterations_large_action, 1)):
            checks.integer(owner, name, value, at_least=least)
        min_std = checks.number(owner, "min_std", min_std, low=0.0, low_open=True)
        max_std = checks.number(owner, "max_std", max_std, low=min_std)
        if not 0 < num_elites <= num_samples:
            raise ValueError(f"num_elites must be in (0, num_samples], got {num_elites}")
        if not 0 <= num_pi_trajs < num_samples:
            raise ValueError(f"num_pi_trajs must be in [0, num_samples), got {num_pi_trajs}")
        self.model = model
        self.action_dim = action_dim
        self.discount = discount
        self.horizon, self.num_samples, self.num_pi_trajs = horizon, num_samples, num_pi_trajs
        self.num_elites = num_elites
        self.iterations = iterations_large_action if action_dim >= 20 else iterations
        self.min_std, self.max_std = min_std, max_std
        self.deterministic_eval = deterministic_eval
        self.soft_termination = soft_termination
        # Warm-start means per stream ("train" / "eval"): [E, H, A].
        self._prev_mean: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, torch.Tensor] = {}

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"prev_mean": {k: v.clone() for k, v in self._prev_mean.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stream, mean in state["prev_mean"].items():
            E, device = mean.shape[0], mean.device
            self._warm_start_buffer(stream, E, device).copy_(mean)

    def _warm_start_buffer(self, stream: str, E: int, device) -> torch.Tensor:
        """The stream's warm-start mean [E, H, A], zeros when new (or when E changed).

        Planning updates it in place, so its address never changes: a compiled planning
        call (and a CUDA graph of it) reads and writes the same tensor on every call.
        """
        buf = self._prev_mean.get(stream)
        shape, device = (E, self.horizon, self.action_dim), torch.device(device)
        if buf is not None and buf.shape == shape and buf.device == device:
            return buf
        if buf is not None and buf.shape == shape:  # loaded from a checkpoint on the CPU
            buf = buf.to(device)
        else:
            buf = torch.zeros(shape, device=device)
        torch._dynamo.mark_static_address(buf)  # for compile: the address never changes
        self._prev_mean[stream] = buf
        return buf

    # -- scoring ----------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Sum_t gamma^t r_t + gamma^H Q(z_H, pi(z_H)).

        Episodic models stop counting a trajectory from the first step whose predicted
        termination probability exceeds 0.5 (the termination head reads post-transition
        latents); with `soft_termination`, step t is weighted by the probability of not
        having terminated before it.

        Shapes: z [E, N, L] (or [E, 1, L]: one latent shared by the N candidates, whose
        first-step work then runs once), actions [H, E, N, A] -> [E, N].
        """
        G = torch.zeros(actions.shape[1:-1] + (1,), device=z.device)  # [E, N, 1]
        alive = torch.ones_like(G)  # [E, N, 1]
        discount = 1.0
        for t in range(self.horizon):
            r = self.model.decode(self.model.reward(z, actions[t]))  # [E, N, 1]
            z = self.model.next(z, actions[t])  # [E, N, L]
            G = G + discount * alive * r
            discount *= self.discount
            if self.model.episodic:
                p_end = self.model.termination(z)  # [E, N, 1]
                alive = alive * (1 - p_end if self.soft_termination
                                 else (p_end <= 0.5).to(alive.dtype))
        a, _ = self.model.pi(z, target=True)
        G = G + discount * alive * self.model.Q(z, a, return_type="avg")  # [E, N, 1]
        return G.squeeze(-1).nan_to_num(0.0)  # [E, N]

    def _policy_candidates(self, z: torch.Tensor) -> torch.Tensor:
        """Roll the policy prior through the dynamics.  z [E, L] -> [H, E, P, A]."""
        E, P = z.shape[0], self.num_pi_trajs
        zp = z.unsqueeze(1).expand(E, P, z.shape[-1])  # [E, P, L]
        out = []
        for t in range(self.horizon):
            a, _ = self.model.pi(zp, target=True)  # [E, P, A]
            out.append(a)
            if t < self.horizon - 1:
                zp = self.model.next(zp, a)
        return torch.stack(out)  # [H, E, P, A]

    # -- the update rule ----------------------------------------------------------------
    def _refit(self, elite_scores: torch.Tensor, elite_actions: torch.Tensor,
               mean: torch.Tensor):
        """New (mean [E, H, A], std [E, H, A], weights [E, K]) from the elites.

        elite_scores [E, K], elite_actions [H, E, K, A], mean [E, H, A] (the current one).
        """
        raise NotImplementedError

    # -- planning ---------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, z: torch.Tensor, is_first: torch.Tensor, *, eval_mode: bool = False) -> torch.Tensor:
        """One action per env.  z [E, L], is_first [E] -> [E, A]; stats in `last_stats`."""
        a, stats = self.step(z, is_first.to(z.device), self.warm_start(z, eval_mode), eval_mode)
        self.keep_stats(stats)
        return a

    def warm_start(self, z: torch.Tensor, eval_mode: bool) -> torch.Tensor:
        """The warm-start mean buffer `step` reads and updates for this batch of envs (one
        per stream: "train" / "eval")."""
        return self._warm_start_buffer("eval" if eval_mode else "train", z.shape[0], z.device)

    def keep_stats(self, stats: dict[str, torch.Tensor]) -> None:
        # Copies: under CUDA graphs a graph's outputs live in buffers its next replay
        # overwrites.
        self.last_stats = {k: v.clone() for k, v in stats.items()}

    @staticmethod
    def _shift(prev_mean: torch.Tensor, is_first: torch.Tensor) -> torch.Tensor:
        """The warm start: the previous mean shifted by one step (zero tail), cleared where
        an episode starts.  [E, H, A], is_first [E] -> [E, H, A]."""
        mean = torch.cat([prev_mean[:, 1:], torch.zeros_like(prev_mean[:, :1])], dim=1)
        return mean * (~is_first).view(-1, 1, 1).to(mean.dtype)

    @torch.no_grad()
    def step(self, z: torch.Tensor, is_first: torch.Tensor, prev_mean: torch.Tensor,
             eval_mode: bool):
        """A planning call on tensors alone (one graph under torch.compile): shift the
        previous mean by one step (zero tail, cleared where is_first), search, and store
        the final mean in `prev_mean` in place.  -> (action [E, A], stats)."""
        a, mean, stats = self._search(z, self._shift(prev_mean, is_first), eval_mode)
        prev_mean.copy_(mean)
        return a, stats

    def _search(self, z: torch.Tensor, mean: torch.Tensor, eval_mode: bool):
        """Iterate from the warm-start mean.  -> (action [E, A], final mean, stats)."""
        E, device = z.shape[0], z.device
        H, N, P, A = self.horizon, self.num_samples, self.num_pi_trajs, self.action_dim
        pi_actions = self._policy_candidates(z) if P > 0 else None  # [H, E, P, A]
        z1 = z.unsqueeze(1)  # [E, 1, L]: every candidate starts from the env's latent
        std = torch.full_like(mean, self.max_std)  # [E, H, A]
        for _ in range(self.iterations):
            noise = torch.randn(H, E, N - P, A, device=device)
            sample = mean.transpose(0, 1).unsqueeze(2) + std.transpose(0, 1).unsqueeze(2) * noise
            actions = sample.clamp(-1, 1)  # [H, E, N-P, A]
            if pi_actions is not None:
                actions = torch.cat([pi_actions, actions], dim=2)  # [H, E, N, A]
            scores = self._score(z1, actions)  # [E, N]
            elite_scores, idx = torch.topk(scores, self.num_elites, dim=1)  # [E, K]
            elite_actions = torch.gather(
                actions, 2, idx.view(1, E, -1, 1).expand(H, E, -1, A))  # [H, E, K, A]
            mean, std, weights = self._refit(elite_scores, elite_actions, mean)
            std = std.clamp(self.min_std, self.max_std)
        # Action selection
        if eval_mode and self.deterministic_eval:
            pick = elite_scores.argmax(dim=1)  # [E]
        else:
            pick = torch.multinomial(weights, 1).squeeze(1)  # [E]
        chosen = elite_actions[:, torch.arange(E, device=device), pick]  # [H, E, A]
        a = chosen[0]  # [E, A]
        if not eval_mode:
            a = a + std[:, 0] * torch.randn(E, A, device=device)
        stats = {
            "chosen_value": elite_scores.gather(1, pick.unsqueeze(1)).mean(),
            "elite_mean": elite_scores.mean(),
            "elite_std": elite_scores.std(),
            "final_std": std[:, 0].mean(),
        }
        return a.clamp(-1, 1), mean, stats
