"""Random draws that compiled graphs make in program order (CPU).

A compiled graph's random draws come from eager PyTorch's generator
(`torch._inductor.config.fallback_random`), so compiled and eager code with one seed draw
the same numbers only if they draw in the same order. Nothing in the graph ties two
independent draws together: inductor is free to schedule a policy's noise before or
after a dropout mask drawn earlier in the program, and did once the graph's products
became custom ops (the compiled agent's policy loss then differed from eager's by 1e-3).

Under torch.compile, on CPU, the draws here are custom ops that all mutate one token
tensor. A mutation of the same tensor is a dependency the compiler keeps, so the draws
run in the order the program makes them, whatever else the graph holds. Outside
compiled code (and on other devices) they are the plain torch calls: the same numbers
from the same generator.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["multinomial", "randint", "randn", "randn_like", "randperm", "token"]

# The tensor every compiled CPU draw mutates (its value is never read).
_TOKEN = torch.zeros(1)
_SEEDED = (torch.Tag.nondeterministic_seeded,)


def token() -> torch.Tensor:
    """The tensor that orders compiled draws (for other draw ops, e.g. rlcore.bernoulli)."""
    return _TOKEN


def ordered(device: torch.device | str | None) -> bool:
    """Whether a draw on `device` goes through the ordered ops (compiling, on CPU)."""
    return torch.compiler.is_compiling() and torch.device(device or "cpu").type == "cpu"


@torch.library.custom_op("tdmpc2::randn", mutates_args=("token",), tags=_SEEDED)
def _randn_op(token: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return torch.randn(size)


@_randn_op.register_fake
def _(token, size):
    return token.new_empty(size)


@torch.library.custom_op("tdmpc2::randperm", mutates_args=("token",), tags=_SEEDED)
def _randperm_op(token: torch.Tensor, n: int) -> torch.Tensor:
    return torch.randperm(n)


@_randperm_op.register_fake
def _(token, n):
    return token.new_empty(n, dtype=torch.int64)


@torch.library.custom_op("tdmpc2::randint", mutates_args=("token",), tags=_SEEDED)
def _randint_op(token: torch.Tensor, low: int, high: int, size: Sequence[int]) -> torch.Tensor:
    return torch.randint(low, high, size)


@_randint_op.register_fake
def _(token, low, high, size):
    return token.new_empty(size, dtype=torch.int64)


@torch.library.custom_op("tdmpc2::multinomial", mutates_args=("token",), tags=_SEEDED)
def _multinomial_op(token: torch.Tensor, weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    return torch.multinomial(weights, num_samples)


@_multinomial_op.register_fake
def _(token, weights, num_samples):
    return weights.new_empty(*weights.shape[:-1], num_samples, dtype=torch.int64)


def randn(*size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.randn(*size, device=device)` (float32)."""
    if ordered(device):
        return torch.ops.tdmpc2.randn(_TOKEN, list(size))
    return torch.randn(*size, device=device)


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """`torch.randn_like(x)`."""
    if x.dtype == torch.float32 and ordered(x.device):
        return torch.ops.tdmpc2.randn(_TOKEN, list(x.shape))
    return torch.randn_like(x)


def randperm(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.randperm(n, device=device)`."""
    if ordered(device):
        return torch.ops.tdmpc2.randperm(_TOKEN, n)
    return torch.randperm(n, device=device)


def randint(low: int, high: int, size: Sequence[int],
            device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.randint(low, high, size, device=device)`."""
    if ordered(device):
        return torch.ops.tdmpc2.randint(_TOKEN, low, high, list(size))
    return torch.randint(low, high, tuple(size), device=device)


def multinomial(weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    """`torch.multinomial(weights, num_samples)` (without replacement, as torch's default)."""
    if ordered(weights.device):
        return torch.ops.tdmpc2.multinomial(_TOKEN, weights, num_samples)
    return torch.multinomial(weights, num_samples)
