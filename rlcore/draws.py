"""Random draws that compiled graphs make in program order (CPU and CUDA).

A compiled graph's random draws come from eager PyTorch's generator
(`torch._inductor.config.fallback_random`), so compiled and eager code with one seed draw
the same numbers only if they draw in the same order. Nothing in the graph ties two
independent draws together: inductor is free to schedule a policy's noise before or
after a dropout mask drawn earlier in the program, and did once the graph's products
became custom ops (the compiled test agent's policy loss then differed from eager's by
7e-4 to 9e-4).

Under torch.compile, on CPU and CUDA, the draws here are custom ops that all mutate one
token tensor per device type. A mutation of the same tensor is a dependency the compiler
keeps, so the draws run in the order the program makes them, whatever else the graph
holds. Outside compiled code (and on other devices) they are the plain torch calls: the
same numbers from the same generator. On CUDA the token lives on the GPU (created by
`prepare(module)` before compiling, with a static address, so CUDA graphs may mutate it);
one process draws on one GPU.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["multinomial", "ordered", "prepare", "randint", "randn", "randn_like", "randperm",
           "token"]

# The tensor every compiled draw on a device type mutates (its value is never read).
_TOKENS: dict[str, torch.Tensor] = {"cpu": torch.zeros(1)}
_ORDERED_TYPES = ("cpu", "cuda")
_SEEDED = (torch.Tag.nondeterministic_seeded,)


def token(device: torch.device | str | None = None) -> torch.Tensor:
    """The tensor that orders compiled draws on `device`'s type (also for other draw ops,
    e.g. rlcore.bernoulli). The CUDA one is made on first use, which must come before
    compiling (`prepare`, which `components.agent.compile_networks` and the planners'
    `compile` call)."""
    kind = torch.device(device or "cpu").type
    tok = _TOKENS.get(kind)
    if tok is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(f"rlcore.draws has no {kind} token yet: call "
                               "rlcore.draws.prepare(module) before compiling")
        tok = _TOKENS[kind] = torch.zeros(1, device=kind)
    return tok


def prepare(module: torch.nn.Module) -> None:
    """Ready compiled code that draws on `module`'s device to draw as eager code does:
    inductor's draws fall back to eager PyTorch's generator, and the device's token
    exists before tracing, with a static address (CUDA graphs may then mutate it in place).
    Call it before `torch.compile` of anything that runs `module`.
    """
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    for p in module.parameters():
        torch._dynamo.mark_static_address(token(p.device))
        break


def ordered(device: torch.device | str | None) -> bool:
    """Whether a draw on `device` goes through the ordered ops (compiling, CPU or CUDA)."""
    return (torch.compiler.is_compiling()
            and torch.device(device or "cpu").type in _ORDERED_TYPES)


# Registered with the low-level library API: its Python kernels cost about 3 us per call
# here, against about 13 us through `torch.library.custom_op`'s wrappers, and planning
# draws several times per call.
_LIB = torch.library.Library("tdmpc2", "FRAGMENT")
_LIB.define("randn(Tensor(a!) token, SymInt[] size) -> Tensor", tags=_SEEDED)
_LIB.define("randperm(Tensor(a!) token, SymInt n) -> Tensor", tags=_SEEDED)
_LIB.define("randint(Tensor(a!) token, SymInt low, SymInt high, SymInt[] size) -> Tensor",
            tags=_SEEDED)
_LIB.define("multinomial(Tensor(a!) token, Tensor weights, SymInt num_samples) -> Tensor",
            tags=_SEEDED)
for _key in ("CPU", "CUDA"):  # each draw on the token's device, from its generator
    _LIB.impl("randn", lambda token, size: torch.randn(size, device=token.device), _key)
    _LIB.impl("randperm", lambda token, n: torch.randperm(n, device=token.device), _key)
    _LIB.impl("randint", lambda token, low, high, size: torch.randint(
        low, high, size, device=token.device), _key)
    _LIB.impl("multinomial", lambda token, weights, k: torch.multinomial(weights, k), _key)


@torch.library.register_fake("tdmpc2::randn")
def _(token, size):
    return token.new_empty(size)


@torch.library.register_fake("tdmpc2::randperm")
def _(token, n):
    return token.new_empty(n, dtype=torch.int64)


@torch.library.register_fake("tdmpc2::randint")
def _(token, low, high, size):
    return token.new_empty(size, dtype=torch.int64)


@torch.library.register_fake("tdmpc2::multinomial")
def _(token, weights, num_samples):
    return weights.new_empty(*weights.shape[:-1], num_samples, dtype=torch.int64)


def randn(*size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.randn(*size, device=device)` (float32)."""
    if ordered(device):
        return torch.ops.tdmpc2.randn(token(device), list(size))
    return torch.randn(*size, device=device)


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """`torch.randn_like(x)`."""
    if x.dtype == torch.float32 and ordered(x.device):
        return torch.ops.tdmpc2.randn(token(x.device), list(x.shape))
    return torch.randn_like(x)


def randperm(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.randperm(n, device=device)`."""
    if ordered(device):
        return torch.ops.tdmpc2.randperm(token(device), n)
    return torch.randperm(n, device=device)


def randint(low: int, high: int, size: Sequence[int],
            device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.randint(low, high, size, device=device)`."""
    if ordered(device):
        return torch.ops.tdmpc2.randint(token(device), low, high, list(size))
    return torch.randint(low, high, tuple(size), device=device)


def multinomial(weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    """`torch.multinomial(weights, num_samples)` (without replacement, as torch's default)."""
    if ordered(weights.device):
        return torch.ops.tdmpc2.multinomial(token(weights.device), weights, num_samples)
    return torch.multinomial(weights, num_samples)
