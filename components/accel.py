"""Accelerated drop-in parts, kept apart from the reference algorithm.

Each part is a function `model -> model` registered as `@accel.<name>` and applied by
`TDMPC2Agent.model_transforms`; a speed preset under `gin/presets/` binds it, so the
operative `config.gin` records whether it ran. The reference classes do not know these
parts exist. A part stays here only while it earns at least 10% end-to-end env steps/s
on its own, measured side by side (`docs/benchmarks.md`), and it computes the reference
function within float32 rounding (`tests/components/test_accel.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rlcore.registry import register


class OneExpMish(nn.Module):
    """Mish with one exponential: x * n / (n + 2), n = e^x (e^x + 2).

    tanh(softplus(x)) = n / (n + 2), so this is Mish itself, with one exponential per
    element where PyTorch's Mish evaluates exp, log1p and tanh.
    Above x = 20, n / (n + 2) is 1 in float32, so the exponential is clamped there
    (no overflow, and the gradient is Mish's, 1).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(x.clamp(max=20.0))
        n = e * (e + 2.0)
        return x * (n / (n + 2.0))


@register("accel")
def one_exp_mish(model: nn.Module) -> nn.Module:
    """Replace every `nn.Mish` in `model` (target copies included) with `OneExpMish`.

    Parameters, their names and checkpoints are unchanged (Mish has no state).
    Preset: `gin/presets/fast_mish.gin`.
    """
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Mish:
                setattr(module, name, OneExpMish())
    return model
