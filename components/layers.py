"""Building blocks of the TD-MPC2 world model (Hansen et al., 2024, App. A).

Not registered: these are parts of components, not components. A hidden layer is
Linear -> (Dropout) -> LayerNorm -> Mish; SimNorm softmaxes groups of 8 latent units.
`EnsembleMLP` holds the weights of M members stacked in one tensor per layer, so the
whole ensemble runs as batched matmuls (no Python loop over members), and can evaluate
only a chosen subset of members.

Speed (CPU measurements in README, Benchmarks): `mish` and `SimNorm` compute the same
functions as `F.mish` and a last-dim softmax, faster. PyTorch's CPU softmax over a last
dimension of 8 is slow, so SimNorm softmaxes a transposed copy (groups along a strided
dimension, vectorized across groups); Mish's forward uses one exponential instead
of exp + log1p + tanh. On CPU, EnsembleMLP runs one GEMM per member (`_EnsembleLinear`;
without autograd and with oneDNN, each member's layers on its own tensors), and `Linear`
layers take oneDNN's products (`rlcore.gemm`).
`reference_kernels()` switches all of these back to the plain PyTorch ops, which the
tests use to show the results agree within float tolerance.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.fused import fused_available, layer_norm_mish, layer_norm_simnorm
from rlcore import gemm
from rlcore.bernoulli import dropout as _dropout
from rlcore.bernoulli import apply_dropout_mask as _apply_mask
from rlcore.bernoulli import dropout_mask

_REFERENCE = False


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within this block, `mish`, `SimNorm`, the fused kernels, ensembles and Linear
    layers use the plain PyTorch ops (for tests)."""
    global _REFERENCE
    saved, _REFERENCE = _REFERENCE, True
    try:
        with gemm.plain():
            yield
    finally:
        _REFERENCE = saved


def folds_bias(x: torch.Tensor) -> bool:
    """Whether a Linear followed by a fused LayerNorm kernel runs its product without the
    bias and lets the kernel add it (CPU float32, eager and compiled: compiled graphs call
    the kernel as an op, see `components.fused`). An `addmm` first writes the
    broadcast bias into its output and then accumulates the product onto it, a full extra
    pass over the output, and its backward sums the output gradient's rows in another;
    the kernel adds the bias to each row while the row sits in L1, and its backward sums
    the rows' gradients as it writes them. The product is then a plain matmul, so values
    change at float32 rounding level (the bias is added after the product, not before)."""
    return (not _REFERENCE and x.device.type == "cpu" and x.dtype == torch.float32
            and fused_available())


def _compiled_off_cpu(x: torch.Tensor) -> bool:
    """Whether `x` is traced by torch.compile for a device other than the CPU. There
    `mish` and `grad_columns` give way to plain ops, whose forward and backward inductor
    fuses itself (the hand-written gradients save CPU time). On CUDA (H100, torch 2.11)
    graphs compiled with `_MishFunction` returned zero gradients for every parameter
    upstream of a Mish (encoder, Q ensemble, dynamics' hidden layers) while the losses
    were right, and eager CUDA matched the reference kernels; with plain Mish the
    compiled gradients matched eager, with or without the grad-column functions. The
    GPU tests in tests/components/test_compile.py ran with both replaced."""
    return x.device.type != "cpu" and torch.compiler.is_compiling()


def _fast_mish(x: torch.Tensor) -> torch.Tensor:
    # d = (e + 1)^2 + 1 = e (e + 2) + 2; mish = x (1 - 2 / d), in place on one buffer
    # (a fused addcdiv measured several times slower on CPU).
    d = torch.exp(x).add_(1).square_().add_(1)
    return d.reciprocal_().mul_(-2).add_(1).mul_(x)


class _MishFunction(torch.autograd.Function):
    """Mish with a cheap closed-form gradient.

    With e = exp(min(x, 20)) and d = e (e + 2) + 2: mish(x) = x - 2x / d and
    mish'(x) = 1 - 2/d + 4x e (e + 1) / d^2, arithmetic on the saved e and 1/d instead
    of re-evaluating tanh, softplus and sigmoid. Clamping at 20 is exact in float32 (there
    2/d < 1e-17) and keeps every intermediate finite.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(x.clamp(max=20.0))
        r = e.add(1).square_().add_(1).reciprocal_()  # 1 / d
        ctx.save_for_backward(x, e, r)
        return r.mul(-2).add_(1).mul_(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, e, r = ctx.saved_tensors
        q = torch.addcmul(e, e, e).mul_(x).mul_(4)  # 4x e (e + 1)
        return q.mul_(r).sub_(2).mul_(r).add_(1).mul_(grad)  # (q/d - 2)/d + 1


def mish(x: torch.Tensor) -> torch.Tensor:
    """x * tanh(softplus(x)), as `F.mish`.

    Computed as x - 2x / (n + 2) with n = e^x (e^x + 2), since tanh(softplus(x)) =
    n / (n + 2): one exponential and in-place arithmetic, finite for any finite x (e^x =
    inf gives x, e^x = 0 gives 0). With autograd, see `_MishFunction`.
    """
    if _REFERENCE or x.dtype not in (torch.float32, torch.float64) or _compiled_off_cpu(x):
        return F.mish(x)
    if x.requires_grad and torch.is_grad_enabled():
        return _MishFunction.apply(x)
    if torch.compiler.is_compiling():  # out of place: inductor fuses it with what precedes
        e = torch.exp(x)
        return x - 2 * x / (e * (e + 2) + 2)
    return _fast_mish(x)


class Mish(nn.Module):
    """`mish` as a module (drop-in for nn.Mish)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class SimNorm(nn.Module):
    """Simplicial normalization: softmax over consecutive groups of `dim` units."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        groups = x.reshape(-1, shape[-1] // self.dim, self.dim)  # [N, L/dim, dim]
        if _REFERENCE:
            return F.softmax(groups, dim=-1).view(shape)  # [..., L]
        # Softmax along a strided dim of a contiguous [N, dim, L/dim] copy: same values,
        # several times faster on CPU than a softmax over a last dim of 8.
        out = F.softmax(groups.transpose(1, 2).contiguous(), dim=1)  # [N, dim, L/dim]
        return out.transpose(1, 2).reshape(shape)  # [..., L]

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Dropout(nn.Dropout):
    """`nn.Dropout` whose CPU mask is drawn by `rlcore.bernoulli` (the same values, faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(x, self.p, self.training) if not self.inplace else super().forward(x)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose products run through
    `rlcore.gemm.linear`: oneDNN on CPU in eager mode, faster than MKL there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)


class NormedLinear(nn.Sequential):
    """Linear -> (Dropout) -> LayerNorm -> activation (Mish unless given)."""

    def __init__(self, in_dim: int, out_dim: int, *, dropout: float = 0.0,
                 act: nn.Module | None = None):
        layers: list[nn.Module] = [Linear(in_dim, out_dim)]
        if dropout:
            layers.append(Dropout(dropout))
        layers += [nn.LayerNorm(out_dim), act if act is not None else Mish()]
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self[0]
        if lin.bias is not None and folds_bias(x) and len(self) == 3:
            # the product without its bias, which the fused kernel adds (no dropout here)
            return self.post_linear(gemm.linear(x, lin.weight), bias=lin.bias)
        return self.post_linear(lin(x))

    def post_linear(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Everything after the Linear: (Dropout ->) LayerNorm -> activation. LayerNorm
        followed by Mish or SimNorm runs as one fused kernel where it applies
        (`components.fused`). `bias`: the Linear's, when h is its product without it."""
        *pre, ln, act = list(self)[1:]
        if bias is not None and pre:
            h, bias = h + bias, None
        for layer in pre:
            h = layer(h)
        if (not _REFERENCE and ln.weight is not None and ln.bias is not None
                and len(ln.normalized_shape) == 1):
            y = None
            if isinstance(act, Mish):
                y = layer_norm_mish(h, ln.weight, ln.bias, ln.eps, bias=bias)
            elif isinstance(act, SimNorm):
                y = layer_norm_simnorm(h, ln.weight, ln.bias, ln.eps, act.dim, bias=bias)
            if y is not None:
                return y
        if bias is not None:
            h = h + bias
        return act(ln(h))


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, *, out_act: nn.Module | None = None,
        dropout: float = 0.0) -> nn.Sequential:
    """An MLP of NormedLinear hidden layers.

    With `out_act`, the output layer is a NormedLinear with that activation (TD-MPC2's
    encoder and dynamics end in LayerNorm + SimNorm); otherwise a plain Linear.
    Dropout, if any, is applied in the first layer only.
    """
    dims = [in_dim, *hidden]
    layers: list[nn.Module] = [
        NormedLinear(dims[i], dims[i + 1], dropout=dropout if i == 0 else 0.0)
        for i in range(len(dims) - 1)
    ]
    if out_act is not None:
        layers.append(NormedLinear(dims[-1], out_dim, act=out_act))
    else:
        layers.append(Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


def broadcast_pair(z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [..., L] and a [..., A] expanded (views, no copy) to their common leading shape."""
    lead = torch.broadcast_shapes(z.shape[:-1], a.shape[:-1])
    return z.expand(*lead, z.shape[-1]), a.expand(*lead, a.shape[-1])


def concat_mlp(net: nn.Sequential, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`net(cat([z, a], -1))` for an `mlp` whose first Linear reads [z, a].

    z and a may differ in leading shape as long as they broadcast (planning passes one
    latent per env, z [E, 1, L], with N action candidates, a [E, N, A]). Then the first
    layer is computed as z W_z + a W_a + b, so z's share runs once per distinct latent
    instead of once per candidate; the result is the same function. When only one of z
    and a needs a gradient (a latent beside an action that is data), the first layer's
    input gradient is computed for that part's columns only (`rlcore.gemm.linear`).

    Shapes: z [..., L], a [..., A] (broadcastable) -> [broadcast(...), out].
    """
    first = net[0][0] if isinstance(net[0], NormedLinear) else net[0]
    if _REFERENCE or not isinstance(first, nn.Linear):
        return net(torch.cat(broadcast_pair(z, a), -1))
    L = z.shape[-1]
    mods = list(net)
    # the fused kernel after the first Linear adds its bias (see `folds_bias`)
    fold = (isinstance(mods[0], NormedLinear) and first.bias is not None
            and folds_bias(z))
    bias = None if fold else first.bias
    if z.shape[:-1] == a.shape[:-1]:
        cols = grad_columns(z, a)
        if cols is None:
            return net(torch.cat([z, a], -1))
        h = gemm.linear(torch.cat([z, a], -1), first.weight, bias, grad_cols=cols)
    else:
        h = F.linear(a, first.weight[:, L:], bias) + F.linear(z, first.weight[:, :L])
    if isinstance(mods[0], NormedLinear):
        h = mods[0].post_linear(h, bias=first.bias if fold else None)
    for layer in mods[1:]:
        h = layer(h)
    return h


def init_weights(module: nn.Module) -> None:
    """TD-MPC2 init: truncated normal (std 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, EnsembleMLP):
            m.reset_parameters()


def zero_last_linear(module: nn.Module) -> None:
    """Zero-initialize the last Linear layer (reward and Q outputs in TD-MPC2)."""
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)


def _member_list(members: torch.Tensor | None, num_members: int,
                 x: torch.Tensor) -> tuple[int, ...] | None:
    """The members to run as one GEMM each (CPU, eager), or None for one batched matmul.

    On CPU a batched matmul over M members splits the batch across threads, so M = 5 on 2
    threads leaves a thread idle a third of the time (about 155 vs 185 GFLOP/s measured
    here); one multithreaded GEMM per member does not. Elsewhere (CUDA, torch.compile,
    reference kernels, repeated members) the batched matmul stays.
    """
    if _REFERENCE or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    idx = tuple(range(num_members)) if members is None else tuple(members.tolist())
    return idx if len(set(idx)) == len(idx) else None


def grad_columns(z: torch.Tensor, a: torch.Tensor) -> tuple[int, int] | None:
    """The columns of cat([z, a], -1) whose input gradient is needed, when only one of
    the two parts needs one: (0, L) for a latent that needs a gradient beside an action
    that is data (model losses), (L, L + A) for an action beside a detached latent (the
    policy loss). None when both or neither need one, outside autograd, or in graphs
    compiled for another device than the CPU (see `_compiled_off_cpu`)."""
    if (not torch.is_grad_enabled() or z.requires_grad == a.requires_grad
            or _compiled_off_cpu(z)):
        return None
    L = z.shape[-1]
    return (0, L) if z.requires_grad else (L, L + a.shape[-1])


def _member_products(x: torch.Tensor, w: torch.Tensor, idx: tuple[int, ...]) -> torch.Tensor:
    """x[j] @ w[i_j] for members idx, one GEMM each, without bias or autograd (see
    `folds_bias`). x [1 or m, N, in] (1: shared), w [M, in, out] -> [m, N, out]."""
    x = x.contiguous()
    out = x.new_empty(len(idx), x.shape[1], w.shape[2])
    for j, i in enumerate(idx):
        torch.mm(x[j if x.shape[0] > 1 else 0], w[i], out=out[j])
    return out


class _EnsembleLinear(torch.autograd.Function):
    """out[j] = x[j] @ w[i_j] + b[i_j] for members idx = (i_0, i_1, ...), one GEMM each.

    x [1 or m, N, in] (1: the same input for every member), w [M, in, out], b [M, 1, out]
    (or None: plain products, the caller adds the bias, see `folds_bias`) -> [m, N, out].
    The same function as `baddbmm(b[idx], x.expand(m, ...), w[idx])`; outputs and
    gradients are written in place into slices (no stacking copies), and members not in
    idx get zero gradient, as indexing would give them. With `grad_cols`
    = (lo, hi) the caller promises that only input columns lo..hi-1 feed something that
    needs a gradient (a latent concatenated with an action, one of them without
    gradient; see `grad_columns`): the other columns' input gradient is returned as zero
    instead of computed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                idx: tuple[int, ...], grad_cols: tuple[int, int] | None = None) -> torch.Tensor:
        x = x.contiguous()
        if b is None:  # the caller adds the bias (see `folds_bias`)
            out = _member_products(x, w, idx)
        else:
            out = x.new_empty(len(idx), x.shape[1], w.shape[2])
            for j, i in enumerate(idx):
                torch.addmm(b[i], x[j if x.shape[0] > 1 else 0], w[i], out=out[j])
        ctx.save_for_backward(x, w)
        ctx.idx, ctx.grad_cols = idx, grad_cols
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        idx = ctx.idx
        lo, hi = ctx.grad_cols or (0, x.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # need_b: False without b
        grad = grad.contiguous()
        every = idx == tuple(range(w.shape[0]))
        shared = x.shape[0] == 1
        partial = (lo, hi) != (0, x.shape[-1])
        gx = (x.new_zeros(x.shape) if partial else x.new_empty(x.shape)) if need_x else None
        gw = (torch.empty_like(w) if every else torch.zeros_like(w)) if need_w else None
        gb = None
        if need_b:
            gb = grad.sum(1, keepdim=True)  # [m, 1, out]
            if not every:
                gb = gb.new_zeros(w.shape[0], 1, w.shape[2]).index_copy_(
                    0, torch.tensor(idx, device=gb.device), gb)
        for j, i in enumerate(idx):
            if need_w:
                torch.mm(x[0 if shared else j].t(), grad[j], out=gw[i])
            if need_x:
                g = gx[0 if shared else j][:, lo:hi]  # [N, hi - lo]
                if shared and j > 0:  # the shared input's gradient sums over members
                    # (out= rather than addmm_: FlopCounterMode does not count addmm_)
                    torch.addmm(g, grad[j], w[i][lo:hi].t(), out=g)
                else:
                    torch.mm(grad[j], w[i][lo:hi].t(), out=g)
        return gx, gw, gb, None, None


class _BatchedLinearGradCols(torch.autograd.Function):
    """`baddbmm(b, x, w)` whose input gradient covers only the columns `grad_cols`.

    x [m, N, in] (an expanded view is fine), w [m, in, out], b [m, 1, out] or None (the
    caller adds it, see `folds_bias`) -> [m, N, out].
    The caller promises that only input columns lo..hi-1 feed something that needs a
    gradient (see `grad_columns`): the others' gradient is returned as zero instead of
    computed, so the input-gradient product is [N, out] x [out, hi - lo] per member
    instead of [N, out] x [out, in]. The batched counterpart of `_EnsembleLinear`'s
    `grad_cols`, for the paths that run the ensemble as batched products (CUDA,
    torch.compile). `per_member`: one GEMM per member, stacked (CPU under torch.compile,
    see `_member_list`), instead of one batched matmul.
    """

    @staticmethod
    def forward(ctx, b: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor,
                grad_cols: tuple[int, int], per_member: bool = False) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.grad_cols, ctx.per_member = grad_cols, per_member
        if per_member:
            return torch.stack([torch.mm(x[m], w[m]) if b is None
                                else torch.addmm(b[m], x[m], w[m]) for m in range(w.shape[0])])
        return torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        lo, hi = ctx.grad_cols
        need_b, need_x, need_w = ctx.needs_input_grad[:3]
        gb = grad.sum(1, keepdim=True) if need_b else None
        gx = gw = None
        if ctx.per_member:
            members = range(w.shape[0])
            if need_x:
                gx = torch.stack([torch.mm(grad[m], w[m, lo:hi].t()) for m in members])
            if need_w:
                gw = torch.stack([torch.mm(x[m].t(), grad[m]) for m in members])
        else:
            if need_x:
                gx = torch.bmm(grad, w[:, lo:hi].transpose(1, 2))
            if need_w:
                gw = torch.bmm(x.transpose(1, 2), grad)
        if gx is not None:
            gx = gemm.pad_columns(gx, (lo, hi), x.shape[-1])
        return gb, gx, gw, None, None


class EnsembleMLP(nn.Module):
    """M independent MLPs with stacked weights, run as batched matmuls.

    Hidden layers are Linear -> (Dropout, first layer only) -> LayerNorm -> Mish per
    member; the output layer is Linear. Parameters are `w{i}`/`b{i}` of shape
    [M, in, out] / [M, 1, out] and `ln_w{i}`/`ln_b{i}` of shape [M, 1, out].

    Shapes: x [..., in] -> [M, ..., out]; with `members` (an index tensor of length m),
    only those members run and the output is [m, ..., out].
    """

    def __init__(self, num_members: int, in_dim: int, hidden: Sequence[int], out_dim: int, *,
                 dropout: float = 0.0, zero_output: bool = False):
        super().__init__()
        self.num_members = num_members
        self.dims = [in_dim, *hidden, out_dim]
        self.dropout = dropout
        self.zero_output = zero_output
        self.num_layers = len(self.dims) - 1
        for i in range(self.num_layers):
            fan_in, fan_out = self.dims[i], self.dims[i + 1]
            self.register_parameter(f"w{i}", nn.Parameter(torch.empty(num_members, fan_in, fan_out)))
            self.register_parameter(f"b{i}", nn.Parameter(torch.empty(num_members, 1, fan_out)))
            if i < self.num_layers - 1:
                self.register_parameter(f"ln_w{i}", nn.Parameter(torch.empty(num_members, 1, fan_out)))
                self.register_parameter(f"ln_b{i}", nn.Parameter(torch.empty(num_members, 1, fan_out)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for i in range(self.num_layers):
            w = getattr(self, f"w{i}")
            if i == self.num_layers - 1 and self.zero_output:
                w.zero_()
            else:
                nn.init.trunc_normal_(w, std=0.02)
            getattr(self, f"b{i}").zero_()
            if i < self.num_layers - 1:
                getattr(self, f"ln_w{i}").fill_(1.0)
                getattr(self, f"ln_b{i}").zero_()

    def layer_groups(self) -> list[list[str]]:
        """Parameter names per layer, first to last (used by resets of the last k layers)."""
        groups = []
        for i in range(self.num_layers):
            names = [f"w{i}", f"b{i}"]
            if i < self.num_layers - 1:
                names += [f"ln_w{i}", f"ln_b{i}"]
            groups.append(names)
        return groups

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None, *,
                input_grad_cols: tuple[int, int] | None = None) -> torch.Tensor:
        """`input_grad_cols` = (lo, hi): only input columns lo..hi-1 need a gradient; the
        others get zero instead (see `grad_columns`, `_EnsembleLinear` and
        `_BatchedLinearGradCols`)."""
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1])  # [1, N, in]
        idx = _member_list(members, self.num_members, x)
        if (idx is not None and not torch.is_grad_enabled()
                and not (self.dropout and self.training) and gemm.uses_onednn(h, self.w0[0].t())):
            out = self._members_without_grad(h[0], idx)  # [m, N, out], planning, TD targets
            return out.view(out.shape[0], *lead, out.shape[-1])
        compiled_cpu = x.device.type == "cpu" and torch.compiler.is_compiling()
        # the fused kernels add the hidden biases: eager CPU (one GEMM per member) and
        # compiled CPU (all members: per member GEMMs, stacked, for inductor; drawn
        # members: one bmm on their gathered weights, without baddbmm's bias copy)
        fold = (idx is not None or compiled_cpu) and folds_bias(x)
        for i in range(self.num_layers):
            w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
            # hidden layers leave their bias (and dropout) to the fused kernel
            drop = i == 0 and bool(self.dropout) and self.training
            folded = fold and i < self.num_layers - 1
            bias = (b if members is None else b[members]) if folded else None
            if folded and idx is not None and not torch.is_grad_enabled():
                h = _member_products(h, w, idx)  # [m, N, out], without the bias
            elif idx is not None:  # one GEMM per member, see _EnsembleLinear
                h = _EnsembleLinear.apply(h, w, None if folded else b, idx,
                                          input_grad_cols if i == 0 else None)
            elif i == 0 and input_grad_cols is not None and not _REFERENCE:
                if members is not None:
                    w, b = w[members], b[members]  # [m, in, out], [m, 1, out]
                h = _BatchedLinearGradCols.apply(None if folded else b,
                                                 h.expand(w.shape[0], -1, -1), w,
                                                 input_grad_cols,
                                                 compiled_cpu and members is None)
            elif members is None and compiled_cpu:
                # the same per member GEMMs for inductor, which writes them into one buffer
                # (without the bias where the kernel adds it: an addmm's output starts as a
                # copy of the broadcast bias, a pass over it)
                h = torch.stack([torch.mm(h[m if h.shape[0] > 1 else 0], w[m]) if folded
                                 else torch.addmm(b[m], h[m if h.shape[0] > 1 else 0], w[m])
                                 for m in range(w.shape[0])])
            else:
                if members is not None:
                    w, b = w[members], b[members]  # [m, in, out], [m, 1, out]
                if i == 0 and _REFERENCE:
                    h = torch.matmul(h, w) + b
                elif folded:  # the fused kernel adds the bias
                    h = torch.bmm(h.expand(w.shape[0], -1, -1), w)
                else:  # one batched matmul with the bias fused; contiguous [M, N, out]
                    h = torch.baddbmm(b, h.expand(w.shape[0], -1, -1), w)
            # h: [M, N, out]
            if i < self.num_layers - 1:
                # dropout after the bias: the mask drawn here, applied by the fused kernel
                # (or below, the same values); F.dropout where no mask is drawn
                ln_w, ln_b = getattr(self, f"ln_w{i}"), getattr(self, f"ln_b{i}")
                if members is not None:
                    ln_w, ln_b = ln_w[members], ln_b[members]
                # a byte per value where the fused kernel reads it (a quarter of the
                # memory written, read forward and backward, and kept for the backward)
                mask = dropout_mask(h, self.dropout, torch.uint8 if not _REFERENCE
                                    and fused_available() else None) if drop else None
                y = None if _REFERENCE or (drop and mask is None) else layer_norm_mish(
                    h, ln_w, ln_b, bias=bias, dropout_mask=mask, keep=1.0 - self.dropout)
                if y is None:
                    if bias is not None:
                        h = h + bias
                    if mask is not None:
                        h = _apply_mask(h, mask.to(h.dtype), 1.0 - self.dropout)
                    elif drop:
                        h = F.dropout(h, self.dropout)
                    h = mish(torch.addcmul(ln_b, F.layer_norm(h, h.shape[-1:]), ln_w))
                else:
                    h = y
        return h.reshape(h.shape[0], *lead, h.shape[-1])  # [M, ..., out]

    def _members_without_grad(self, x: torch.Tensor, idx: tuple[int, ...]) -> torch.Tensor:
        """The members idx on x [N, in], without autograd, each member's layers on its own
        tensors: oneDNN's products add the bias themselves, where an `addmm` into a slice
        of the stacked output first copies the broadcast bias into it (1 MB per member
        and layer in E=1 planning). Only the last layer's outputs are stacked.
        -> [m, N, out]"""
        hs = [x] * len(idx)
        for i in range(self.num_layers):
            w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
            hs = [gemm.linear(h, w[m].t(), b[m].view(-1)) for h, m in zip(hs, idx)]
            if i < self.num_layers - 1:
                ln_w, ln_b = getattr(self, f"ln_w{i}"), getattr(self, f"ln_b{i}")
                for j, m in enumerate(idx):
                    y = layer_norm_mish(hs[j], ln_w[m].view(-1), ln_b[m].view(-1))
                    hs[j] = y if y is not None else mish(
                        F.layer_norm(hs[j], hs[j].shape[-1:], ln_w[m].view(-1), ln_b[m].view(-1)))
        return torch.stack(hs)

    def extra_repr(self) -> str:
        return f"members={self.num_members}, dims={self.dims}, dropout={self.dropout}"


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_parameter_names(module: nn.Module) -> list[list[str]]:
    """Fully qualified parameter names of each layer of `module`, first to last.

    A layer is a Linear (or convolution) together with the LayerNorm that follows it (as
    in NormedLinear), or one layer of an EnsembleMLP (all members, its `layer_groups()`
    prefixed by its name). Names are as in `module.named_parameters()`. Used by resets of
    the last k layers.
    """
    layers: list[list[str]] = []
    for prefix, m in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(m, EnsembleMLP):
            layers += [[dot + n for n in group] for group in m.layer_groups()]
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            layers.append([dot + n for n, _ in m.named_parameters(recurse=False)])
        elif isinstance(m, nn.LayerNorm) and layers:
            layers[-1] += [dot + n for n, _ in m.named_parameters(recurse=False)]
    return layers
