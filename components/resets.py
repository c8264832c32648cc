"""Reset strategies (variant, SPEC §6), a small class family as in Dopamine's labs/redo.

Resets of chosen module groups fight the primacy bias (Nikishin et al. 2022, The Primacy
Bias in Deep RL); shrink-and-perturb is the gentler form (Ash & Adams 2020, On
Warm-Starting Neural Network Training).

The agent calls its strategy after every update with the update count
(`strategy(agent, agent.num_updates)`). When a reset is due, the strategy changes the
chosen parameters in place and calls `agent.on_reset(params, groups)`, which clears the
touched parameters' optimizer moments, re-syncs the target/EMA copies of the reset groups
and resets the running scale. Fresh draws use the global torch RNG (seeded by the runner),
so a run is reproducible, and `state_dict()` makes a resumed run continue exactly.

Module groups are those of `WorldModel.module_groups()`: encoder, dynamics, reward,
termination, q, aux_q, policy. `last_k` limits a reset to the last k layers of each module
(a layer is a Linear with the LayerNorm that follows it, or one layer of an ensemble; see
`layers.layer_parameter_names`).
"""

from __future__ import annotations

import copy
import numbers
import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn

from components.layers import layer_parameter_names
from rlcore.registry import register

KNOWN_GROUPS = ("encoder", "dynamics", "reward", "termination", "q", "aux_q", "policy")
# SPEC §6 lists these; the termination head is reset only when named explicitly.
DEFAULT_GROUPS = ("encoder", "dynamics", "reward", "q", "aux_q", "policy")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class ResetStrategy:
    """Base class: the schedule (in updates) and the choice of parameters.

    Subclasses give the new values of the chosen parameters (`_new_values`).

    Args:
        groups: module groups to reset, a subset of KNOWN_GROUPS. A group the model does
            not have is skipped: silently when it is in DEFAULT_GROUPS (aux_q without
            auxiliary heads), with a one-time warning otherwise (termination on a task
            without a termination head), so one config serves both kinds of task.
        every: reset every this many updates (counted after the update: 1, 2, ...).
        at_updates: reset at these update counts (each >= 1); combines with `every`.
        last_k: reset only the parameters of the last k layers of each module; None: all.

    Raises ValueError at construction on an empty or unknown group, a missing schedule,
    every <= 0, an update count < 1, or last_k < 1.
    """

    def __init__(self, *, groups: Sequence[str] = DEFAULT_GROUPS, every: int | None = None,
                 at_updates: Sequence[int] = (), last_k: int | None = None):
        name = type(self).__name__
        if isinstance(groups, str):
            raise ValueError(f"{name}.groups must be a sequence of group names, not the "
                             f"string {groups!r}; write ({groups!r},)")
        groups = tuple(groups)
        if not groups:
            raise ValueError(f"{name}.groups is empty; name at least one of {KNOWN_GROUPS}")
        unknown = [g for g in groups if g not in KNOWN_GROUPS]
        if unknown:
            raise ValueError(f"{name}.groups has unknown group(s) {unknown}; "
                             f"known groups: {KNOWN_GROUPS}")
        if len(set(groups)) != len(groups):
            raise ValueError(f"{name}.groups names a group twice: {groups}")
        if isinstance(at_updates, (str, bytes)) or not isinstance(at_updates, Sequence):
            raise ValueError(f"{name}.at_updates must be a sequence of update counts, "
                             f"got {at_updates!r}")
        at_updates = tuple(at_updates)
        if every is None and not at_updates:
            raise ValueError(f"{name} has no schedule: set {name}.every (updates) and/or "
                             f"{name}.at_updates (update counts)")
        if every is not None and (not _is_int(every) or every <= 0):
            raise ValueError(f"{name}.every must be a positive number of updates, got {every!r}")
        bad = [u for u in at_updates if not _is_int(u) or u < 1]
        if bad:
            raise ValueError(f"{name}.at_updates must be update counts >= 1 (the agent counts "
                             f"updates from 1), got {bad}")
        if last_k is not None and (not _is_int(last_k) or last_k < 1):
            raise ValueError(f"{name}.last_k must be an integer >= 1 (or None for all "
                             f"layers), got {last_k!r}")
        self.groups = groups
        self.every = None if every is None else int(every)
        self.at_updates = tuple(sorted({int(u) for u in at_updates}))
        self.last_k = None if last_k is None else int(last_k)
        self.num_resets = 0
        self.last_reset_update: int | None = None
        self._warned: set[str] = set()

    # -- schedule -----------------------------------------------------------------------
    def due(self, num_updates: int) -> bool:
        """Is a reset due after update number `num_updates`?"""
        if self.every is not None and num_updates > 0 and num_updates % self.every == 0:
            return True
        return num_updates in self.at_updates

    # -- selection ----------------------------------------------------------------------
    def selected_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(group name, module) of the chosen groups that `model` has, in `groups` order."""
        available = model.module_groups()
        out = []
        for g in self.groups:
            if g in available:
                out.append((g, available[g]))
            elif g not in DEFAULT_GROUPS and g not in self._warned:
                self._warned.add(g)
                warnings.warn(f"{type(self).__name__}: the model has no {g!r} group; "
                              "skipping it", stacklevel=3)
        return out

    def selected_names(self, module: nn.Module) -> list[str]:
        """Names (as in `module.named_parameters()`) of the parameters to reset."""
        if self.last_k is None:
            return [n for n, _ in module.named_parameters()]
        layers = layer_parameter_names(module)
        return [n for layer in layers[-self.last_k:] for n in layer]

    def _new_values(self, module: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """New values of the parameters `names` of `module` (no gradient)."""
        raise NotImplementedError

    # -- the call -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, agent: Any, num_updates: int) -> bool:
        """Reset if due after update `num_updates`; True when parameters were reset."""
        if not self.due(num_updates):
            return False
        touched: list[nn.Parameter] = []
        touched_groups: list[str] = []
        for gname, module in self.selected_modules(agent.model):
            names = self.selected_names(module)
            if not names:
                continue
            params = dict(module.named_parameters())
            new = self._new_values(module, names)
            for n in names:
                params[n].copy_(new[n])
                touched.append(params[n])
            touched_groups.append(gname)
        if not touched:
            return False
        agent.on_reset(touched, touched_groups)
        self.num_resets += 1
        self.last_reset_update = int(num_updates)
        return True

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"num_resets": self.num_resets, "last_reset_update": self.last_reset_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_resets = int(state["num_resets"])
        last = state.get("last_reset_update")
        self.last_reset_update = None if last is None else int(last)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(groups={self.groups}, every={self.every}, "
                f"at_updates={self.at_updates}, last_k={self.last_k})")


def fresh_init(module: nn.Module) -> dict[str, torch.Tensor]:
    """A fresh draw of the module's own init: a deep copy, re-drawn by `reset_parameters()`
    (global torch RNG), read as name -> tensor."""
    if not hasattr(module, "reset_parameters"):
        raise TypeError(f"{type(module).__name__} has no reset_parameters(); a reset needs "
                        "each module group to re-draw its own init")
    fresh = copy.deepcopy(module)
    fresh.reset_parameters()
    return {n: p.detach() for n, p in fresh.named_parameters()}


@register("resets")
class NoReset(ResetStrategy):
    """Never resets (the default TD-MPC2 behaviour)."""

    def __init__(self):
        self.groups, self.every, self.at_updates, self.last_k = (), None, (), None
        self.num_resets, self.last_reset_update = 0, None
        self._warned = set()

    def due(self, num_updates: int) -> bool:
        return False

    def __call__(self, agent: Any, num_updates: int) -> bool:
        return False

    def __repr__(self) -> str:
        return "NoReset()"


@register("resets")
class ShrinkPerturb(ResetStrategy):
    """Shrink-and-perturb (Ash & Adams 2020, On Warm-Starting Neural Network Training).

    theta <- alpha * theta + (1 - alpha) * theta_init, where theta_init is a fresh draw of
    the module's own init (its `reset_parameters()`). With `noise_std` = sigma, the noise
    form theta <- alpha * theta + sigma * eps, eps ~ N(0, 1), is used instead. As a
    remedy for the primacy bias: Nikishin et al. 2022, The Primacy Bias in Deep RL.

    Args:
        groups, every, at_updates, last_k: see ResetStrategy.
        alpha: shrink factor in [0, 1] (1: unchanged; 0: a full reset).
        noise_std: sigma >= 0 of the noise form; None: interpolate towards a fresh init.
    """

    def __init__(self, *, groups: Sequence[str] = DEFAULT_GROUPS, every: int | None = None,
                 at_updates: Sequence[int] = (), last_k: int | None = None,
                 alpha: float = 0.8, noise_std: float | None = None):
        super().__init__(groups=groups, every=every, at_updates=at_updates, last_k=last_k)
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN
            raise ValueError(f"ShrinkPerturb.alpha must lie in [0, 1], got {alpha!r}")
        if noise_std is not None and not noise_std >= 0.0:
            raise ValueError(f"ShrinkPerturb.noise_std must be >= 0 (or None for the "
                             f"interpolation form), got {noise_std!r}")
        self.alpha = float(alpha)
        self.noise_std = None if noise_std is None else float(noise_std)

    def _new_values(self, module, names):
        params = dict(module.named_parameters())
        if self.noise_std is not None:
            return {n: self.alpha * params[n] + self.noise_std * torch.randn_like(params[n])
                    for n in names}
        fresh = fresh_init(module)
        return {n: self.alpha * params[n] + (1.0 - self.alpha) * fresh[n] for n in names}

    def __repr__(self) -> str:
        return (super().__repr__()[:-1]
                + f", alpha={self.alpha}, noise_std={self.noise_std})")


@register("resets")
class FullReset(ResetStrategy):
    """Full reset: re-draw the chosen parameters with the module's own init
    (Nikishin et al. 2022, The Primacy Bias in Deep RL).

    Args: groups, every, at_updates, last_k (see ResetStrategy).
    """

    def _new_values(self, module, names):
        fresh = fresh_init(module)
        return {n: fresh[n] for n in names}
