"""Adam steps that torch.compile traces into the caller's graph.

`torch.optim.Optimizer.step` and `zero_grad` always break a torch.compile graph (PyTorch
marks them so), and Adam creates its state on the first step. To compile a whole update
(losses, backward, clipping, optimizer steps) as one graph, the agent keeps its
`torch.optim.Adam` objects (their state, hyperparameters and `state_dict` format are
unchanged) and steps them through torch's functional Adam, with the state created up
front. The arithmetic is `torch.optim.Adam`'s own; eager results are the same.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch.optim.adam import adam


def init_adam_state(optim: torch.optim.Adam) -> None:
    """Create every parameter's Adam state (step 0, zero moments) now, as the first
    `step()` would, so a compiled update finds it and keeps its addresses."""
    for group in optim.param_groups:
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            if optim.state.get(p):
                continue
            optim.state[p] = {
                "step": torch.zeros((), dtype=torch.float32,
                                    device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def load_adam_state(optim: torch.optim.Adam, state: dict) -> None:
    """`optim.load_state_dict(state)`, keeping how `optim` runs (fused, foreach,
    capturable: a checkpoint of an eager run may be resumed compiled, and back), then
    creating any state the checkpoint lacks."""
    how = [{k: g[k] for k in ("foreach", "fused", "capturable")} for g in optim.param_groups]
    # a copy: torch's load keeps the given tensors, which may be another optimizer's state
    optim.load_state_dict(copy.deepcopy(state))
    for group, kept in zip(optim.param_groups, how):
        group.update(kept)
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            if "step" in optim.state.get(p, {}):
                step = optim.state[p]["step"]
                optim.state[p]["step"] = step.to(p.device if on_device else "cpu",
                                                 torch.float32)
    init_adam_state(optim)


def reset_adam_state(optim: torch.optim.Adam, params: Iterable[torch.Tensor]) -> None:
    """Zero the Adam state of `params` in place: the state of a freshly built optimizer."""
    touched = {id(p) for p in params}
    for group in optim.param_groups:
        for p in group["params"]:
            if id(p) in touched and p in optim.state:
                for value in optim.state[p].values():
                    value.zero_()


def zero_grads(params: Iterable[torch.Tensor]) -> None:
    """`optimizer.zero_grad(set_to_none=True)` in a form torch.compile traces."""
    for p in params:
        p.grad = None


@torch.no_grad()
def adam_step(optim: torch.optim.Adam) -> None:
    """`optim.step()` for an Adam optimizer whose state exists (`init_adam_state`)."""
    for group in optim.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        state = [optim.state[p] for p in params]
        beta1, beta2 = group["betas"]
        # `capturable` keeps the step count on the device so a traced graph has no host
        # sync; eager CPU Adam refuses it, and a compiled agent's step also runs eagerly
        # (torch.compiler's force_eager stance: the benchmark's FLOP count). Both forms
        # compute the same update.
        capturable = group["capturable"] and (params[0].device.type != "cpu"
                                              or torch.compiler.is_compiling())
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in state],
             [s["exp_avg_sq"] for s in state], [], [s["step"] for s in state],
             foreach=group["foreach"], fused=group["fused"], capturable=capturable,
             differentiable=False, has_complex=False, amsgrad=False, beta1=beta1,
             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=False, decoupled_weight_decay=group.get("decoupled_weight_decay", False))
