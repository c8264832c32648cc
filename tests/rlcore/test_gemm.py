"""rlcore.gemm: F.linear on oneDNN (CPU, eager), with autograd, FLOP counting and fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rlcore import gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(),
                                  reason="this torch has no usable oneDNN linear op")


@pytest.fixture(autouse=True)
def _onednn_on(monkeypatch):
    """oneDNN on whatever CPU runs the tests (by default only on AMD x86 with AVX-512)."""
    monkeypatch.setenv("TDMPC2_ONEDNN", "1")


def _weights(kind: str, out: int, inp: int) -> torch.Tensor:
    """w [out, in] laid out as the callers pass it: contiguous, a transposed contiguous
    tensor (ensemble weights [in, out] seen as [out, in]), or a column slice with gaps
    between rows (a Linear's weight [:, lo:hi])."""
    if kind == "contiguous":
        return torch.randn(out, inp)
    if kind == "transposed":
        return torch.randn(inp, out).t()
    return torch.randn(out, inp + 7)[:, 3:3 + inp]


@needs_onednn
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "gaps"])
@pytest.mark.parametrize("lead", [(6,), (2, 3, 4), (0,)])
def test_linear_equals_f_linear_on_onednn(kind, lead):
    torch.manual_seed(0)
    w, b = _weights(kind, 9, 13), torch.randn(9)
    x = torch.randn(*lead, 13)
    assert gemm.uses_onednn(x, w)
    for bias in (b, None):
        y = gemm.linear(x, w, bias)
        assert y.shape == (*lead, 9)
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_product_is_counted_and_profiled_as_a_matrix_product():
    from runners.bench import MATRIX_OPS, executed_matrix_flops

    x, w = torch.randn(2, 5, 13), torch.randn(9, 13)
    with FlopCounterMode(display=False) as counter:
        gemm.linear(x, w)
    assert counter.get_total_flops() == 2 * 10 * 13 * 9
    assert "mkldnn::_linear_pointwise" in MATRIX_OPS
    assert executed_matrix_flops(lambda: gemm.linear(x, w)) == 2 * 10 * 13 * 9


@needs_onednn
def test_onednn_results_repeat_and_do_not_depend_on_threads():
    torch.manual_seed(0)
    x, w = torch.randn(300, 64), torch.randn(48, 64)
    first = gemm.linear(x, w)
    assert torch.equal(first, gemm.linear(x, w))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = gemm.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


@pytest.mark.parametrize("cols", [None, (0, 8), (8, 13)])
@pytest.mark.parametrize("onednn", [True, False])
def test_linear_gradients_equal_f_linear(cols, onednn):
    """Input (on the chosen columns; zeros elsewhere), weight and bias gradients equal
    F.linear's, on oneDNN and inside `plain()`."""
    if onednn and not gemm.onednn_available():
        pytest.skip("this torch has no usable oneDNN linear op")
    torch.manual_seed(0)
    x = torch.randn(2, 6, 13, requires_grad=True)
    w = torch.randn(9, 13, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    g = torch.randn(2, 6, 9)
    ref = torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)
    ctx = gemm.plain() if not onednn else torch.enable_grad()
    with ctx:
        got = torch.autograd.grad(gemm.linear(x, w, b, grad_cols=cols), (x, w, b), g)
    lo, hi = cols or (0, 13)
    torch.testing.assert_close(got[0][..., lo:hi], ref[0][..., lo:hi], rtol=1e-5, atol=1e-5)
    assert got[0][..., :lo].abs().sum() == 0 and got[0][..., hi:].abs().sum() == 0
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_plain_and_the_environment_switch_give_torch_products(monkeypatch):
    """Inside `plain()`, with TDMPC2_ONEDNN=0 and for other dtypes the result is
    F.linear's own, bit for bit; by default oneDNN is on only on AMD x86 with AVX-512."""
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 13), torch.randn(9, 13), torch.randn(9)
    with gemm.plain():
        assert not gemm.uses_onednn(x, w)
        assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setenv("TDMPC2_ONEDNN", "0")
    assert not gemm.uses_onednn(x, w)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setenv("TDMPC2_ONEDNN", "1")
    monkeypatch.delenv("TDMPC2_ONEDNN")
    assert gemm.uses_onednn(x, w) == (gemm._measured_kind_of_cpu() and gemm.onednn_available())
    xd, wd, bd = x.double(), w.double(), b.double()
    assert not gemm.uses_onednn(xd, wd)
    assert torch.equal(gemm.linear(xd, wd, bd), F.linear(xd, wd, bd))


def test_linear_module_keeps_nn_linear_parameters_and_state_dict():
    from components.layers import Linear

    torch.manual_seed(0)
    lin = Linear(13, 9)
    ref = torch.nn.Linear(13, 9)
    ref.load_state_dict(lin.state_dict())
    assert isinstance(lin, torch.nn.Linear)
    assert list(lin.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 13, requires_grad=True)
    torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)
    lin(x).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref(x).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
