"""The TD-MPC2 world model: wires injected parts and exposes its verbs.

`encode / next / reward / termination / pi / Q / aux_Q`, as in Hansen et al. (2024), §3.
The model owns the target copies (Q ensemble, auxiliary Q heads; Polyak-averaged), the
optional EMA copies of the policy and the encoder (variant), and the two-hot bin settings
shared by the reward and value heads. Optional parts that are off build nothing.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn

from rlcore import math as rmath
from rlcore.registry import register
from rlcore.types import EnvSpec


def _frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False).train(False)


@register("models")
class WorldModel(nn.Module):
    """Encoder, latent dynamics, reward head, Q ensemble and policy prior, plus options.

    Collaborators are classes (gin references); the model calls them with the values
    known only at run time (spec, latent and action dimensions, bin count).

    Args:
        termination_head: a head predicting episode ends; built only for episodic tasks
            (`spec.episodic`), so the same config serves both kinds of task.
        aux_q_head: auxiliary Q heads (multi-gamma, variant), built only when
            `aux_discounts` is non-empty. Planner scores, the policy loss and the TD
            targets never read them; their loss trains the shared encoder and dynamics.
        aux_discounts: the G auxiliary discounts, each in (0, 1).
        policy_ema_tau / encoder_ema_tau: build EMA copies (variant) of the policy (used
            for acting, planning and TD targets) and of the encoder (consistency and
            TD-target latents); None: no copy.

    Shapes: obs [..., *obs] -> z [..., L]; (z, a [..., A]) -> z' [..., L], reward logits
    [..., K], Q logits [Q, ..., K], aux Q logits [..., G, K]; pi(z) -> a [..., A].
    """

    def __init__(self, spec: EnvSpec, *, encoder: Callable[..., nn.Module],
                 dynamics: Callable[..., nn.Module], reward_head: Callable[..., nn.Module],
                 q_head: Callable[..., nn.Module], policy_head: Callable[..., nn.Module],
                 termination_head: Callable[..., nn.Module] | None = None,
                 aux_q_head: Callable[..., nn.Module] | None = None,
                 aux_discounts: Sequence[float] = (), latent_dim: int = 512,
                 num_bins: int = 101, vmin: float = -10.0, vmax: float = 10.0,
                 policy_ema_tau: float | None = None, encoder_ema_tau: float | None = None):
        super().__init__()
        for g in aux_discounts:
            if not 0.0 < g < 1.0:
                raise ValueError(f"WorldModel.aux_discounts must lie in (0, 1), got {g}")
        if aux_discounts and aux_q_head is None:
            raise ValueError("WorldModel.aux_discounts is set but WorldModel.aux_q_head is None; "
                             "bind it, e.g. WorldModel.aux_q_head = @heads.JointAuxQHead")
        for name, tau in (("policy_ema_tau", policy_ema_tau), ("encoder_ema_tau", encoder_ema_tau)):
            if tau is not None and not 0.0 < tau <= 1.0:
                raise ValueError(f"WorldModel.{name} must lie in (0, 1] (or None), got {tau}")
        self.spec = spec
        self.latent_dim, self.action_dim = latent_dim, spec.action_dim
        self.num_bins, self.vmin, self.vmax = num_bins, vmin, vmax
        za = latent_dim + spec.action_dim
        self._encoder = encoder(spec, latent_dim)
        self._dynamics = dynamics(latent_dim, spec.action_dim)
        self._reward = reward_head(za, num_bins)
        self._termination = (termination_head(latent_dim)
                             if termination_head is not None and spec.episodic else None)
        self._Qs = q_head(za, num_bins)
        self._pi = policy_head(latent_dim, spec.action_dim)
        self.num_q = self._Qs.num_q
        self._target_Qs = _frozen_copy(self._Qs)
        self.register_buffer("aux_discounts", torch.tensor(list(aux_discounts), dtype=torch.float32))
        self.aux_discount_values = tuple(float(g) for g in aux_discounts)  # for names
        self._aux_Qs = aux_q_head(za, num_bins, len(aux_discounts)) if len(aux_discounts) else None
        self._target_aux_Qs = _frozen_copy(self._aux_Qs) if self._aux_Qs is not None else None
        self.policy_ema_tau, self.encoder_ema_tau = policy_ema_tau, encoder_ema_tau
        self._ema_pi = _frozen_copy(self._pi) if policy_ema_tau else None
        self._ema_encoder = _frozen_copy(self._encoder) if encoder_ema_tau else None

    # -- parameter groups -------------------------------------------------------------
    @property
    def episodic(self) -> bool:
        return self._termination is not None

    def module_groups(self) -> dict[str, nn.Module]:
        """Named trainable module groups (optimizer groups, resets, gradient logging)."""
        groups = {"encoder": self._encoder, "dynamics": self._dynamics, "reward": self._reward}
        if self._termination is not None:
            groups["termination"] = self._termination
        groups["q"] = self._Qs
        if self._aux_Qs is not None:
            groups["aux_q"] = self._aux_Qs
        groups["policy"] = self._pi
        return groups

    def target_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, float | None]]:
        """group name -> (copy, online module, EMA rate or None for the Polyak target rate)."""
        pairs = {"q": (self._target_Qs, self._Qs, None)}
        if self._aux_Qs is not None:
            pairs["aux_q"] = (self._target_aux_Qs, self._aux_Qs, None)
        if self._ema_pi is not None:
            pairs["policy"] = (self._ema_pi, self._pi, self.policy_ema_tau)
        if self._ema_encoder is not None:
            pairs["encoder"] = (self._ema_encoder, self._encoder, self.encoder_ema_tau)
        return pairs

    def model_parameters(self) -> list[nn.Parameter]:
        """Everything the model optimizer trains (all but the policy and the copies)."""
        return [p for name, m in self.module_groups().items() if name != "policy"
                for p in m.parameters()]

    def train(self, mode: bool = True):
        super().train(mode)
        for copy_, _, _ in self.target_pairs().values():
            copy_.train(False)
        return self

    # -- verbs ------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor, *, target: bool = False) -> torch.Tensor:
        """z = enc(obs); `target` uses the EMA encoder when there is one."""
        if target and self._ema_encoder is not None:
            return self._ema_encoder(obs)
        return self._encoder(obs)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """z' [..., L]; z and a may differ in leading shape where they broadcast."""
        return self._dynamics(z, a)

    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Reward logits [..., K]; z and a may differ in leading shape where they broadcast."""
        return self._reward(z, a)

    def termination(self, z: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
        """P(episode ends on entering z) [..., 1] (or its logit)."""
        if self._termination is None:
            raise RuntimeError("this world model has no termination head; bind "
                               "WorldModel.termination_head = @heads.TerminationHead")
        out = self._termination(z)
        return out if logits else torch.sigmoid(out)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Two-hot logits [..., K] -> scalar [..., 1]."""
        return rmath.two_hot_inv(logits, self.num_bins, self.vmin, self.vmax)

    def pi(self, z: torch.Tensor, *, deterministic: bool = False, target: bool = False):
        """The policy prior; `target` uses the EMA policy when there is one (acting,
        planning, TD targets), the online one otherwise."""
        net = self._ema_pi if target and self._ema_pi is not None else self._pi
        return net(z, deterministic=deterministic)

    def Q(self, z: torch.Tensor, a: torch.Tensor, *, return_type: str = "min",
          target: bool = False, detach: bool = False) -> torch.Tensor:
        """Q-values from the ensemble.

        return_type `all`: logits of every member [Q, ..., K]. `min` / `avg`: the min or
        mean of two randomly chosen members' decoded values [..., 1]; only those two
        members are evaluated.
        """
        if return_type not in ("min", "avg", "all"):
            raise ValueError(f"return_type must be min, avg or all, got {return_type!r}")
        net = self._target_Qs if target else self._Qs
        if return_type == "all":
            if detach:
                with torch.no_grad():
                    return net(z, a)
            return net(z, a)
        # Only the two members drawn are evaluated; with two members, both, in order
        # (min and mean are symmetric), without a draw.
        members = torch.randperm(self.num_q, device=z.device)[:2] if self.num_q > 2 else None
        if detach:  # no gradient into the critic, but through `a` into the policy
            params = {k: v.detach() for k, v in net.named_parameters()}
            logits = torch.func.functional_call(net, params, (z, a, members))
        else:
            logits = net(z, a, members)  # [2, ..., K]
        q1, q2 = self.decode(logits).unbind(0)  # [..., 1] each
        return torch.min(q1, q2) if return_type == "min" else (q1 + q2) / 2

    def aux_Q(self, z: torch.Tensor, a: torch.Tensor, *, target: bool = False) -> torch.Tensor:
        """Auxiliary Q logits [..., G, K]. Only their loss reads them: planner scores, the
        policy loss and the primary TD target never do, while their gradient does reach the
        shared encoder and dynamics."""
        if self._aux_Qs is None:
            raise RuntimeError("this world model has no auxiliary Q heads (aux_discounts=())")
        net = self._target_aux_Qs if target else self._aux_Qs
        return net(z, a)

    # -- copies -----------------------------------------------------------------------
    @torch.no_grad()
    def soft_update_targets(self, tau: float, groups: Sequence[str] | None = None) -> None:
        """Polyak-average the target Q copies at `tau`, the EMA copies at their own rates
        (only the copies of `groups`, all when None)."""
        for name, (copy_, online, rate) in self.target_pairs().items():
            if groups is not None and name not in groups:
                continue
            rmath.polyak_(list(copy_.parameters()), list(online.parameters()),
                          tau if rate is None else rate)

    @torch.no_grad()
    def sync_copies(self, groups: Sequence[str] | None = None) -> None:
        """Copy online weights into the target/EMA copies of `groups` (all when None)."""
        for name, (copy_, online, _) in self.target_pairs().items():
            if groups is None or name in groups:
                for t, p in zip(copy_.parameters(), online.parameters()):
                    t.copy_(p)
