"""Linear layers' matrix products on CPU through oneDNN, where it is faster than MKL.

torch runs a float32 `F.linear` / `torch.mm` on CPU with MKL. On the AMD EPYC machine
(with AVX-512) in the README, MKL's sgemm takes its generic Zen code path
(`mkl_blas_def_sgemm_kernel_0_zen` in a profile), and oneDNN's AVX-512 matmul
(`brg_matmul:avx512_core`; torch ships it for its own fused inference kernels, as
`torch.ops.mkldnn._linear_pointwise`) ran the same products 8-13% faster: 2048^3 at
211.7 vs 192.5 GFLOP/s, [768, 512] x [512, 512] at 213.1 vs 196.7, [768, 512] x [512, 101]
at 177.6 vs 157.8. Its results differ from MKL's by float32 rounding only (about 1e-6
relative), do not depend on the thread count, and are the same from call to call.

`linear(x, w, b)` is `F.linear` computed that way, with autograd: the input gradient is
the same kind of product, so it takes oneDNN too; the weight gradient (a product over
the batch, with both operands transposed) stays with MKL, which was faster there (190.8
vs 162.2 GFLOP/s). With `grad_cols = (lo, hi)`, only input columns lo..hi-1 get a
gradient (the caller's promise that the others feed nothing that needs one; see
`components.layers.grad_columns`) and the rest are zeros.

oneDNN is used for float32 CPU tensors on AMD x86 CPUs with AVX-512, the kind of machine
where it was measured faster; `TDMPC2_ONEDNN=1` turns it on on other CPUs (Intel's MKL
takes AVX-512 kernels itself there; elsewhere it is untested) and `TDMPC2_ONEDNN=0` off
everywhere (read when a graph is traced, for compiled code). On other devices and dtypes,
inside `plain()`, or where this torch has no such op, the same function runs with torch's
own products. Compiled graphs call the products as the custom op `tdmpc2::linear`, with
the same autograd function around it; inductor would otherwise lower oneDNN's op for
weights it packed itself, which it does only for inference with frozen weights. Products
as opaque ops leave inductor freer to reorder the graph, so every random draw in
compiled code is ordered by `rlcore.draws`.
`FlopCounterMode` counts the oneDNN op like `addmm` (a formula is registered here), so
benchmark FLOP counts do not depend on which library ran.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["linear", "onednn_available", "pad_columns", "plain", "uses_onednn"]

_DISABLED = False


def _op():
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op and it computes `F.linear` here (checked
    once per process on a small product)."""
    op = _op()
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
        b = torch.randn(3, generator=g)
        y = op(x, w, b, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except RuntimeError:
        return False


@functools.cache
def _measured_kind_of_cpu() -> bool:
    """An AMD x86 CPU with AVX-512 (from /proc/cpuinfo), where oneDNN beat MKL."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "AuthenticAMD" in info and " avx512f" in info


def _switched_on() -> bool:
    setting = os.environ.get("TDMPC2_ONEDNN", "")
    if setting == "0" or not (setting == "1" or _measured_kind_of_cpu()):
        return False
    return onednn_available()


@torch.compiler.assume_constant_result
def _switched_on_when_traced() -> bool:
    """`_switched_on()`, read once when a graph is traced (a constant in the graph)."""
    return _switched_on()


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """Within this block, `linear` uses torch's own products (for tests and references)."""
    global _DISABLED
    saved, _DISABLED = _DISABLED, True
    try:
        yield
    finally:
        _DISABLED = saved


def uses_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a product of `x` by `w` (or `w.t()`) runs on oneDNN here."""
    return (not _DISABLED and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and w.dim() == 2 and x.dim() >= 1
            and (_switched_on_when_traced() if torch.compiler.is_compiling()
                 else _switched_on()))


def _product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T (+ b [out]), no autograd; w may be a strided view."""
    if uses_onednn(x, w):
        if torch.compiler.is_compiling():
            return torch.ops.tdmpc2.linear(x, w, b)
        if x.is_contiguous():
            return _dense_product(x, w, b)
    return F.linear(x, w, b)


def pad_columns(g: torch.Tensor, cols: tuple[int, int], width: int) -> torch.Tensor:
    """g [..., hi - lo] placed at columns [lo, hi) of zeros [..., width]."""
    return F.pad(g, (cols[0], width - cols[1]))


class _Linear(torch.autograd.Function):
    """`F.linear(x, w, b)` with the products of `_product`; with `grad_cols`, the input
    gradient covers only those columns (zeros elsewhere)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                grad_cols: tuple[int, int] | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.grad_cols = grad_cols
        return _product(x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        lo, hi = ctx.grad_cols or (0, x.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = grad.reshape(-1, grad.shape[-1])  # [N, out]
        gx = gw = gb = None
        if need_x:
            gx = _product(g2, w[:, lo:hi].t(), None)  # [N, hi - lo]
            if (lo, hi) != (0, x.shape[-1]):
                gx = pad_columns(gx, (lo, hi), x.shape[-1])
            gx = gx.view(x.shape)
        if need_w:
            gw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]))
        if need_b:  # False without a bias
            gb = g2.sum(0)
        return gx, gw, gb, None


def _dense_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's x @ w^T (+ b) for a contiguous x; w may be a strided view."""
    if not (w.is_contiguous() or w.t().is_contiguous()):
        # a slice with gaps between rows (w[:, lo:hi]) sent oneDNN to a reference
        # kernel (0.4-3 s instead of 2 ms for [768, 512] x [512, 512]); a dense copy
        # of the weight costs microseconds
        w = w.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# Compiled graphs call the product as the op `tdmpc2::linear` (inductor's own lowering of
# oneDNN's op expects weights it packed itself, for inference with frozen weights only).
# It has no autograd formula of its own: `_Linear`, traced into the graph, gives the
# gradients. Registered with the low-level library API, whose Python kernel costs about
# 2 us per call here against about 13 us through `torch.library.custom_op`'s wrappers.
_LIB = torch.library.Library("tdmpc2", "FRAGMENT")
_LIB.define("linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
_LIB.impl("linear", lambda x, w, b: _dense_product(x.contiguous(), w, b), "CPU")


@torch.library.register_fake("tdmpc2::linear")
def _(x, w, b):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
           grad_cols: tuple[int, int] | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)`: x [..., in], w [out, in] (a strided view is fine), b [out]
    -> [..., out]; on oneDNN where `uses_onednn` says so. `grad_cols`: see the module."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    if not needs_grad:
        return _product(x, w, b)
    if grad_cols is None and not uses_onednn(x, w):
        return F.linear(x, w, b)
    return _Linear.apply(x, w, b, grad_cols)


def _register_flop_formula() -> None:
    op = _op()
    if op is None:
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(op)
    def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


_register_flop_formula()
