"""`rlcore.draws`: compiled code draws the same numbers as eager code, in program order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlcore import bernoulli as B
from rlcore import draws, gemm


def _program(x, w):
    """Draws of every kind, with products and elementwise work between them that give
    the compiler room to move independent nodes."""
    h = gemm.linear(x, w)  # a custom op where oneDNN is on
    noise = draws.randn_like(h)
    h = B.dropout(torch.tanh(h + noise), 0.2)
    perm = draws.randperm(5)
    shift = draws.randint(0, 4, (3, 2))
    h2 = gemm.linear(F.mish(h), w[:, : h.shape[-1]])
    pick = draws.multinomial(torch.softmax(h2[:4], -1), 2)
    late = draws.randn(2, 3)
    return (h2.square().mean(), noise, h, perm, shift, pick, late)


def test_eager_draws_are_torchs():
    torch.manual_seed(3)
    got = [draws.randn(2, 3), draws.randn_like(torch.empty(4)), draws.randperm(6),
           draws.randint(1, 9, (5,)), draws.multinomial(torch.ones(2, 4), 2)]
    torch.manual_seed(3)
    want = [torch.randn(2, 3), torch.randn(4), torch.randperm(6), torch.randint(1, 9, (5,)),
            torch.multinomial(torch.ones(2, 4), 2)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_compiled_draws_match_eager_in_order(monkeypatch, onednn):
    """Every kind of draw, compiled, gives eager's numbers and leaves the generator where
    eager leaves it. (Inductor does not reorder this small graph even without the token;
    the graph it did reorder, the agent's update with oneDNN products, is covered by
    tests/components/test_compile.py, which fails without the token.)"""
    monkeypatch.setenv("TDMPC2_ONEDNN", onednn)
    torch._dynamo.reset()
    saved = torch._inductor.config.fallback_random
    torch._inductor.config.fallback_random = True
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 24, generator=g, requires_grad=True)
        w = torch.randn(24, 24, generator=g, requires_grad=True)
        compiled = torch.compile(_program, fullgraph=True)
        torch.manual_seed(11)
        out_c = compiled(x, w)
        grads_c = torch.autograd.grad(out_c[0], (x, w))
        after_c = torch.rand(3)
        torch.manual_seed(11)
        out_e = _program(x, w)
        grads_e = torch.autograd.grad(out_e[0], (x, w))
        after_e = torch.rand(3)
    finally:
        torch._inductor.config.fallback_random = saved
    for c, e in zip(out_c, out_e):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    for c, e in zip(grads_c, grads_e):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    assert torch.equal(after_c, after_e)  # the generator ends where eager's does
