"""Building blocks of the TD-MPC2 world model (Hansen et al., 2024, App. A).

Not registered: these are parts of components, not components. A hidden layer is
Linear -> (Dropout) -> LayerNorm -> Mish; SimNorm softmaxes groups of 8 latent units.
`EnsembleMLP` holds the weights of M members stacked in one tensor per layer, so the
whole ensemble runs as batched matmuls (no Python loop over members) and can evaluate
only a chosen subset of members.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class SimNorm(nn.Module):
    """Simplicial normalization: softmax over consecutive groups of `dim` units."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.unflatten(-1, (-1, self.dim))  # [..., L/dim, dim]
        return F.softmax(groups, dim=-1).flatten(-2)  # [..., L]

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class NormedLinear(nn.Sequential):
    """Linear -> (Dropout) -> LayerNorm -> activation (Mish unless given)."""

    def __init__(self, in_dim: int, out_dim: int, *, dropout: float = 0.0,
                 act: nn.Module | None = None):
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.LayerNorm(out_dim), act if act is not None else nn.Mish()]
        super().__init__(*layers)


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
        layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


def broadcast_pair(z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [..., L] and a [..., A] expanded (views, no copy) to their common leading shape."""
    lead = torch.broadcast_shapes(z.shape[:-1], a.shape[:-1])
    return z.expand(*lead, z.shape[-1]), a.expand(*lead, a.shape[-1])


def concat_mlp(net: nn.Sequential, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`net(cat([z, a], -1))` for an `mlp` whose first layer reads [z, a].

    Planning scores N action candidates from one latent per env (z [E, 1, L], a [E, N, A]).
    There the first Linear is split as z W_z + a W_a + b, so the latent's share is
    computed once per env instead of once per candidate: the same function, with a tenth
    of the first step's products at the paper's sizes.

    Shapes: z [..., L], a [..., A] (broadcastable) -> [broadcast(...), out].
    """
    if z.shape[:-1] == a.shape[:-1]:
        return net(torch.cat([z, a], -1))
    first = net[0]
    linear = first[0] if isinstance(first, NormedLinear) else first
    L = z.shape[-1]
    h = F.linear(a, linear.weight[:, L:], linear.bias) + F.linear(z, linear.weight[:, :L])
    rest = list(first)[1:] if isinstance(first, NormedLinear) else []
    for layer in rest + list(net)[1:]:
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
        self.act = nn.Mish()
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

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1])  # [1, N, in]
        m = self.num_members if members is None else len(members)
        for i in range(self.num_layers):
            w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
            if members is not None:
                w, b = w[members], b[members]  # [m, in, out], [m, 1, out]
            h = torch.baddbmm(b, h.expand(m, -1, -1), w)  # [m, N, out]
            if i < self.num_layers - 1:
                if i == 0 and self.dropout:
                    h = F.dropout(h, self.dropout, self.training)
                ln_w, ln_b = getattr(self, f"ln_w{i}"), getattr(self, f"ln_b{i}")
                if members is not None:
                    ln_w, ln_b = ln_w[members], ln_b[members]
                h = self.act(F.layer_norm(h, h.shape[-1:]) * ln_w + ln_b)
        return h.reshape(m, *lead, h.shape[-1])  # [m, ..., out]

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
