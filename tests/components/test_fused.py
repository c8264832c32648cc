"""components.fused: LayerNorm -> affine -> Mish as one CPU kernel, against float64."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import components.layers as layers
from components import fused
from components.layers import EnsembleMLP, NormedLinear, reference_kernels
from rlcore import native

needs_kernel = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None or not native.enabled(),
    reason="no C compiler here (the plain PyTorch path runs instead)")


def _reference(h, w, b):
    return F.mish(torch.addcmul(b, F.layer_norm(h, h.shape[-1:]), w))


def _reference_simnorm(h, w, b):
    z = torch.addcmul(b, F.layer_norm(h, h.shape[-1:]), w)
    return F.softmax(z.unflatten(-1, (-1, 8)), -1).flatten(-2)


KINDS = {"mish": (fused.layer_norm_mish, _reference),
         "simnorm": (fused.layer_norm_simnorm, _reference_simnorm)}


def _grads(fn, h, w, b, g):
    h, w, b = (t.detach().clone().requires_grad_() for t in (h, w, b))
    y = fn(h, w, b)
    y.backward(g)
    return y.detach(), h.grad, w.grad, b.grad


def _case(shape, wshape, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=gen) * scale + 0.3
    w = torch.randn(*wshape, generator=gen)
    b = torch.randn(*wshape, generator=gen)
    g = torch.randn(*shape, generator=gen)
    return h, w, b, g


@needs_kernel
def test_kernel_is_built_and_shares_torchs_openmp_runtime():
    assert fused.fused_available()
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


@needs_kernel
@pytest.mark.parametrize("kind", ["mish", "simnorm"])
@pytest.mark.parametrize("shape,wshape", [((64, 512), (512,)), ((5, 96, 512), (5, 1, 512)),
                                          ((2, 3, 40), (40,)), ((1, 1, 8), (8,)),
                                          ((3, 7, 104), (3, 1, 104))])
def test_forward_and_gradients_match_float64_as_closely_as_torch_float32(kind, shape, wshape):
    fn, reference = KINDS[kind]
    h, w, b, g = _case(shape, wshape)
    exact = _grads(reference, h.double(), w.double(), b.double(), g.double())
    torch32 = _grads(reference, h, w, b, g)
    mine = _grads(fn, h, w, b, g)
    for name, e, t, m in zip(["y", "h", "w", "b"], exact, torch32, mine):
        assert m.shape == e.shape and m.dtype == torch.float32
        tol = 4 * (t.double() - e).abs().max().item() + 1e-6 * (1 + e.abs().max().item())
        assert (m.double() - e).abs().max().item() <= tol, name


@needs_kernel
@pytest.mark.parametrize("kind", ["mish", "simnorm"])
def test_saturated_inputs_and_nan_propagate_like_torch(kind):
    fn, reference = KINDS[kind]
    h = torch.tensor([[1e4, -1e4, 0.0, 5.0] * 4, [float("nan")] + [1.0] * 15])
    w = torch.full((16,), 30.0)
    b = torch.zeros(16)
    y = fn(h, w, b)
    ref = reference(h.double(), w.double(), b.double()).float()
    torch.testing.assert_close(y[0], ref[0], rtol=1e-5, atol=1e-5)
    assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()


@needs_kernel
def test_forward_is_identical_for_any_thread_count():
    h, w, b, _ = _case((5, 64, 128), (5, 1, 128))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.layer_norm_mish(h, w, b)
        torch.set_num_threads(2)
        two = fused.layer_norm_mish(h, w, b)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)


@needs_kernel
def test_mish_takes_any_width_simnorm_groups_of_8_only():
    h, w, b, g = _case((2, 3, 37), (37,))
    exact = _grads(_reference, h.double(), w.double(), b.double(), g.double())
    mine = _grads(fused.layer_norm_mish, h, w, b, g)
    for e, m in zip(exact, mine):
        torch.testing.assert_close(m.double(), e, rtol=1e-4, atol=1e-4)
    assert fused.layer_norm_simnorm(h, w, b) is None  # 37 units: not groups of 8
    h, w, b, _ = _case((4, 32), (32,))
    assert fused.layer_norm_simnorm(h, w, b, dim=4) is None
    assert fused.layer_norm_simnorm(h, w, b, dim=8) is not None


def test_cases_it_does_not_take_return_none():
    h, w, b, _ = _case((4, 16), (16,))
    assert fused.layer_norm_mish(h.double(), w.double(), b.double()) is None
    assert fused.layer_norm_mish(h.t(), w[:4], b[:4]) is None  # not contiguous
    assert fused.layer_norm_mish(h.reshape(2, 2, 16), w.reshape(1, 1, 16).expand(3, 1, 16),
                                 b.reshape(1, 1, 16).expand(3, 1, 16)) is None  # 3 vs 2 members


@needs_kernel
def test_layers_give_the_plain_results(monkeypatch):
    torch.manual_seed(0)
    ens = EnsembleMLP(5, 40, [32, 32], 7)
    lin = NormedLinear(40, 32)
    sim = NormedLinear(40, 32, act=layers.SimNorm(8))
    x = torch.randn(9, 40)
    wsum = torch.randn(32)

    def run():
        out = (ens(x).sum() + lin(x).sum() + ens(x, members=torch.tensor([1, 3])).sum()
               + (sim(x) * wsum).sum())
        params = list(ens.parameters()) + list(lin.parameters()) + list(sim.parameters())
        return out.detach(), torch.autograd.grad(out, params)

    calls = []
    real = fused.layer_norm_mish
    real_sim = fused.layer_norm_simnorm
    monkeypatch.setattr(layers, "layer_norm_mish", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(layers, "layer_norm_simnorm",
                        lambda *a, **k: calls.append(2) or real_sim(*a, **k))
    with_kernel = run()
    assert 1 in calls and 2 in calls  # both fused kernels ran
    monkeypatch.setattr(layers, "layer_norm_mish", lambda *a, **k: None)
    monkeypatch.setattr(layers, "layer_norm_simnorm", lambda *a, **k: None)
    plain = run()
    with reference_kernels():
        reference = run()
    for other in (plain, reference):
        torch.testing.assert_close(with_kernel[0], other[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(with_kernel[1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_switched_off_the_layers_run_plain_pytorch(monkeypatch):
    native.clear()
    monkeypatch.setenv("TDMPC2_NATIVE_KERNELS", "0")
    try:
        assert not fused.fused_available()
        h, w, b, _ = _case((4, 16), (16,))
        assert fused.layer_norm_mish(h, w, b) is None
        lin = NormedLinear(16, 8)
        assert torch.isfinite(lin(h)).all()
    finally:
        native.clear()


@needs_kernel
@pytest.mark.parametrize("kind", ["mish", "simnorm"])
def test_compiled_layer_calls_the_kernel_as_an_op_with_the_bias(monkeypatch, kind):
    """Under torch.compile a LayerNorm -> Mish / SimNorm layer calls the fused kernel as
    the op `tdmpc2::layer_norm_act_v2` (and its backward), without a graph break, and hands
    it the Linear's bias as eager code does (`layers.folds_bias`): the product is a plain
    matmul. Outputs and gradients, the bias's included, equal the plain layer's."""
    import torch._dynamo

    torch.manual_seed(0)
    layer = NormedLinear(40, 32, act=layers.SimNorm(8) if kind == "simnorm" else None)
    x = torch.randn(9, 40, requires_grad=True)
    wsum = torch.randn(32)

    def run(module):
        out = module(x)
        grads = torch.autograd.grad((out * wsum).sum(), [x, *layer.parameters()])
        return out.detach(), grads

    with reference_kernels():
        want = run(layer)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    calls = []
    real_forward, real_backward = fused._forward, fused._backward
    # (activation, whether the Linear's bias came in) of each kernel call
    monkeypatch.setattr(fused, "_forward",
                        lambda *a: calls.append((a[0], a[7] is not None)) or real_forward(*a))
    monkeypatch.setattr(fused, "_backward",
                        lambda *a: calls.append((a[0], a[8] is not None)) or real_backward(*a))
    got = run(torch.compile(layer))
    assert calls == [(kind, True), (kind, True)]  # the forward and the backward, as ops
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("kind", ["mish", "simnorm"])
@pytest.mark.parametrize("shape, wshape", [((9, 32), (32,)), ((3, 6, 40), (3, 1, 40))])
def test_the_kernel_adds_the_linear_bias_as_an_add_before_it_would(kind, shape, wshape):
    """`bias=`: the same values as adding it first, bit for bit without autograd (the
    kernel adds it in float32 as the op would), and its gradient with autograd."""
    fn, _ = KINDS[kind]
    h, w, b, g = _case(shape, wshape)
    lb = torch.randn(*wshape)
    with torch.no_grad():
        assert torch.equal(fn(h, w, b, bias=lb), fn(h + lb, w, b))
    lb_g = lb.clone().requires_grad_()
    y = fn(h, w, b, bias=lb_g)
    y.backward(g)
    lb_ref = lb.clone().requires_grad_()
    fn(h + lb_ref, w, b).backward(g)
    torch.testing.assert_close(lb_g.grad, lb_ref.grad)
    assert fn(h, w, b, bias=lb[..., :-8]) is None  # a bias of another shape: not taken


@needs_kernel
def test_layers_without_autograd_leave_the_bias_to_the_kernel(monkeypatch):
    """Planning and TD targets: hidden layers run their products without the bias and the
    fused kernel adds it (`layers.folds_bias`); outputs equal the plain layers'."""
    torch.manual_seed(0)
    ens = EnsembleMLP(5, 40, [32, 32], 7, dropout=0.01).eval()
    lin = NormedLinear(40, 32)
    sim = NormedLinear(40, 32, act=layers.SimNorm(8))
    x = torch.randn(9, 40)

    def run():
        with torch.no_grad():
            return [ens(x), ens(x, members=torch.tensor([3, 1])), lin(x), sim(x)]

    biases = []
    real = fused._forward
    monkeypatch.setattr(fused, "_forward", lambda *a: biases.append(a[7] is not None)
                        or real(*a))
    got = run()
    # 2 hidden layers x (5 members, then 2), one Mish layer, one SimNorm layer
    assert biases == [True] * 6, biases
    with reference_kernels():
        want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_time_counts_each_kernel_call_and_only_while_active():
    """`kernel_time()` counts the forward and backward kernel calls of a layer (eager and
    compiled: compiled graphs reach the kernels through the ops), with positive time that
    fits inside the wall time around them, and nothing once it has ended."""
    import time

    torch.manual_seed(0)
    layer = NormedLinear(40, 32)
    x = torch.randn(64, 40)
    with fused.kernel_time() as clock:
        t0 = time.perf_counter()
        layer(x).sum().backward()
        wall = time.perf_counter() - t0
    assert clock.calls == 2 and 0 < clock.seconds < wall
    with torch.no_grad(), fused.kernel_time() as compiled_clock:
        torch.compile(layer)(x)
    assert compiled_clock.calls == 1 and compiled_clock.seconds > 0
    layer(x).sum().backward()  # outside: counted nowhere
    assert clock.calls == 2 and compiled_clock.calls == 1


def _run_library(lib, act, h, w, b, g, lb):
    """Forward and backward of one build of the kernels, called directly."""
    R, D = h.numel() // h.shape[-1], h.shape[-1]
    members = w.numel() // D
    rpm = R // members
    y, mean, rstd = torch.empty_like(h), torch.empty(R), torch.empty(R)
    lib.lna_forward(act, h.data_ptr(), lb.data_ptr(), None, 1.0, w.data_ptr(), b.data_ptr(),
                    y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), R, D, rpm, 1e-5)
    gx, gw, gb, glb = (torch.empty_like(t) for t in (h, w, b, lb))
    assert lib.lna_backward(act, g.data_ptr(), h.data_ptr(), lb.data_ptr(), None, 1.0, w.data_ptr(),
                            b.data_ptr(), mean.data_ptr(), rstd.data_ptr(), gx.data_ptr(),
                            gw.data_ptr(), gb.data_ptr(), glb.data_ptr(), R, D, rpm, members) == 0
    return y, mean, rstd, gx, gw, gb, glb


@needs_kernel
@pytest.mark.parametrize("kind", ["mish", "simnorm"])
@pytest.mark.parametrize("shape,wshape", [((64, 512), (512,)), ((3, 7, 104), (3, 1, 104)),
                                          ((5, 40), (40,))])
def test_vector_code_gives_the_plain_c_builds_values_bit_for_bit(kind, shape, wshape):
    """The 8-lane exponential and the transposed SimNorm (AVX CPUs) against the same
    source built without them: the same operations in the same order, so equal bits,
    saturated inputs included."""
    fast, plain = fused._library(), fused._library(scalar=True)
    assert fast is not None and plain is not None and fast is not plain
    h, w, b, g = _case(shape, wshape, scale=3.0)
    h.view(-1)[::17] *= 40.0  # some rows' outliers push the affine into the clamps
    w = w * 8.0
    lb = torch.randn(*wshape)
    act = fused._ACTS[kind]
    for got, want in zip(_run_library(fast, act, h, w, b, g, lb),
                         _run_library(plain, act, h, w, b, g, lb)):
        assert torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.uint8, torch.bool])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_kernel_applies_dropout_as_the_mask_multiply_before_it_would(with_bias,
                                                                         mask_dtype):
    """`dropout_mask=`: (h + bias) * (mask / keep) in the kernel, the same bits as that
    multiply done first (forward, and h's and the affine's gradients); the bias's gradient
    (a sum over rows, in another order) to rounding. A float, uint8 or bool mask alike."""
    h, w, b, g = _case((3, 64, 40), (3, 1, 40))
    lb = torch.randn(3, 1, 40) if with_bias else None
    keep = 0.9
    fmask = (torch.rand(h.shape, generator=torch.Generator().manual_seed(1)) < keep).float()
    mask = fmask.to(mask_dtype)
    with torch.no_grad():
        pre = h + lb if with_bias else h
        assert torch.equal(fused.layer_norm_mish(h, w, b, bias=lb, dropout_mask=mask, keep=keep),
                           fused.layer_norm_mish(pre * (fmask / keep), w, b))

    def grads(fold):
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        ll = lb.clone().requires_grad_() if with_bias else None
        if fold:
            y = fused.layer_norm_mish(hh, ww, bb, bias=ll, dropout_mask=mask, keep=keep)
        else:
            y = fused.layer_norm_mish((hh + ll if with_bias else hh) * (fmask / keep), ww, bb)
        y.backward(g)
        return y.detach(), hh.grad, ww.grad, bb.grad, (ll.grad if with_bias else None)

    got, want = grads(True), grads(False)
    for a, e in zip(got[:4], want[:4]):
        assert torch.equal(a, e)
    if with_bias:
        torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-5)
    assert fused.layer_norm_mish(h, w, b, dropout_mask=mask[:, :5]) is None  # not h's shape


@needs_kernel
def test_ensemble_dropout_in_training_gives_the_plain_layers_results(monkeypatch):
    """The Q ensemble's dropout layer in training: the mask drawn from the same generator
    state, applied by the fused kernel with the bias; the same outputs and gradients as
    plain PyTorch (dropout after the bias add), and the same generator state after."""
    ens = EnsembleMLP(5, 40, [32, 32], 7, dropout=0.3).train()
    x = torch.randn(9, 40)

    def run():
        torch.manual_seed(7)
        out = ens(x)
        grads = torch.autograd.grad((out * out).sum(), list(ens.parameters()))
        return out.detach(), grads, torch.rand(3)

    masks = []
    real = fused._layer_norm_act
    monkeypatch.setattr(fused, "_layer_norm_act", lambda *a: masks.append(
        None if a[6] is None else a[6].dtype) or real(*a))
    got = run()
    # the first layer only; a byte per value (a quarter of a float mask's memory)
    assert masks[0] == torch.uint8 and masks.count(None) == len(masks) - 1, masks
    with reference_kernels():
        want = run()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[2], want[2])  # the draws after it see the same stream
    assert (got[0] != ens.eval()(x).detach()).any()  # dropout did act


def test_the_ops_schemas_are_pinned_to_their_versioned_names():
    """A changed schema needs a new op name (`fused.OP_SCHEMAS`): a graph that inductor
    cached with the C++ wrapper calls the op with the argument list it was compiled for,
    so an old entry would call a changed op with the wrong list. Raise the version in the
    name with the schema, then update the pins here."""
    pinned = {
        "layer_norm_act_v2": "tdmpc2::layer_norm_act_v2(Tensor h, Tensor w, Tensor b, float eps, "
                             "int rpm, str act, Tensor? bias=None, Tensor? mask=None, "
                             "float keep=1.) -> (Tensor, Tensor, Tensor)",
        "layer_norm_act_v2_backward": "tdmpc2::layer_norm_act_v2_backward(Tensor grad, Tensor h, "
                                      "Tensor w, Tensor b, Tensor mean, Tensor rstd, int rpm, "
                                      "str act, Tensor? bias=None, Tensor? mask=None, "
                                      "float keep=1.) -> (Tensor, Tensor, Tensor, Tensor)",
    }
    assert set(fused.OP_SCHEMAS) == set(pinned)
    for name, schema in pinned.items():
        assert str(getattr(torch.ops.tdmpc2, name).default._schema) == schema, name
