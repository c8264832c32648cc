"""rlcore.bernoulli: PyTorch's CPU Bernoulli draw reproduced bit for bit, and dropout on it."""

from __future__ import annotations

import math
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import components.layers as layers
from components.layers import EnsembleMLP, NormedLinear
from rlcore import bernoulli as B
from rlcore import draws
from rlcore import native


def _compiler_present() -> bool:
    return shutil.which(os.environ.get("CC", "cc")) is not None


def test_kernel_builds_where_a_compiler_is_present():
    if not _compiler_present():
        pytest.skip("no C compiler on this machine")
    assert native.enabled()
    assert B.fast_bernoulli_available()


def _advance(seed: int, k: int) -> None:
    torch.manual_seed(seed)
    torch.randn(3)  # leaves a cached normal sample in the generator state
    torch.rand(k)   # an arbitrary offset into the current mt19937 block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8])
def test_same_values_and_generator_state_as_torch(dtype):
    for seed in range(3):
        for n in [1, 2, 7, 311, 312, 313, 623, 624, 625, 1249, 10_007, 20_000 * 16 + 3]:
            for p in [0.99, 0.5, 0.3, 1e-3, 0.0, 1.0]:
                _advance(seed, seed * 37 + n % 5)
                start = torch.get_rng_state()
                ref = torch.empty(n, dtype=dtype).bernoulli_(p)
                ref_state = torch.get_rng_state()
                torch.set_rng_state(start)
                mine = B.bernoulli_(torch.empty(n, dtype=dtype), p)
                assert torch.equal(mine, ref), (seed, n, p)
                assert torch.equal(torch.get_rng_state(), ref_state), (seed, n, p)


@pytest.mark.parametrize("n", [5, 100_003])  # one of the kernel's rounds; many
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_thresholds_equal_to_a_drawn_value_follow_torch(dtype, n):
    """p set to a draw's own v * 2**-53 (and the doubles either side): the comparison is then
    decided by the low word, which random thresholds almost never reach."""
    torch.manual_seed(7)
    start = torch.get_rng_state()
    v = torch.rand(n, dtype=torch.float64)  # the same two words per value as bernoulli_
    for k in [0, 1, n // 2, n - 1]:
        for p in [v[k].item(), math.nextafter(v[k].item(), 2.0), math.nextafter(v[k].item(), -1.0)]:
            torch.set_rng_state(start)
            ref = torch.empty(n, dtype=dtype).bernoulli_(p)
            torch.set_rng_state(start)
            mine = B.bernoulli_(torch.empty(n, dtype=dtype), p)
            assert torch.equal(mine, ref), (k, p)
            assert bool(mine[k]) == (p > v[k].item()), (k, p)


def test_values_differ_from_call_to_call_and_follow_p():
    torch.manual_seed(0)
    a = B.bernoulli_(torch.empty(200_000), 0.9)
    b = B.bernoulli_(torch.empty(200_000), 0.9)
    assert not torch.equal(a, b)
    assert abs(a.mean().item() - 0.9) < 0.005


def test_other_cases_take_torchs_path_with_the_same_values():
    x = torch.empty(64, 33).t()  # not contiguous
    torch.manual_seed(1)
    ref = torch.empty(64, 33).t().bernoulli_(0.7)
    torch.manual_seed(1)
    assert torch.equal(B.bernoulli_(x, 0.7), ref)
    with pytest.raises(RuntimeError):
        B.bernoulli_(torch.empty(4), 1.5)  # torch's own error for p outside [0, 1]


def test_dropout_equals_F_dropout_bit_for_bit_with_gradients():
    x = torch.randn(5, 300, 64, requires_grad=True)
    w = torch.randn(5, 300, 64)
    for p in [0.01, 0.5]:
        torch.manual_seed(3)
        y1 = F.dropout(x, p, training=True)
        g1, = torch.autograd.grad((y1 * w).square().sum(), x)
        after1 = torch.rand(3)
        torch.manual_seed(3)
        y2 = B.dropout(x, p)
        g2, = torch.autograd.grad((y2 * w).square().sum(), x)
        after2 = torch.rand(3)
        assert torch.equal(y1, y2) and torch.equal(g1, g2) and torch.equal(after1, after2)
    assert B.dropout(x, 0.3, training=False) is x


def test_ensemble_and_normed_linear_dropout_unchanged(monkeypatch):
    torch.manual_seed(0)
    ens = EnsembleMLP(5, 40, [32, 32], 7, dropout=0.2)
    lin = NormedLinear(40, 32, dropout=0.2)
    x = torch.randn(9, 40)

    def run():
        torch.manual_seed(11)
        out = ens(x).sum() + lin(x).sum()
        grads = torch.autograd.grad(out, list(ens.parameters()) + list(lin.parameters()))
        return out.detach(), grads

    fast = run()
    monkeypatch.setattr(layers, "_dropout", lambda h, p, training=True: F.dropout(h, p, training))
    monkeypatch.setattr(layers.Dropout, "forward", torch.nn.Dropout.forward)
    plain = run()
    assert torch.equal(fast[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], plain[1]))


def test_compiled_draws_keep_their_order_and_are_never_merged():
    """Two masks of the same tensor and a normal draw between them (`rlcore.draws`, as the
    framework's compiled code draws), compiled, give what eager F.dropout gives: no draw
    merged with another, none reordered or recomputed."""

    def f(x):
        a = B.dropout(x, 0.25)
        n = draws.randn(*x.shape)
        b = B.dropout(x, 0.25)
        return (a * b + n).sum(), a, b

    def ref(x):
        a = F.dropout(x, 0.25, training=True)
        n = torch.randn(x.shape)
        b = F.dropout(x, 0.25, training=True)
        return (a * b + n).sum(), a, b

    torch._dynamo.reset()
    saved = torch._inductor.config.fallback_random
    torch._inductor.config.fallback_random = True
    try:
        compiled = torch.compile(f, fullgraph=True)
        x = torch.randn(64, 48, requires_grad=True)
        torch.manual_seed(5)
        out_c = compiled(x)
        g_c, = torch.autograd.grad(out_c[0], x)
        after_c = torch.rand(2)
        torch.manual_seed(5)
        out_r = ref(x)
        g_r, = torch.autograd.grad(out_r[0], x)
        after_r = torch.rand(2)
    finally:
        torch._inductor.config.fallback_random = saved
    assert not torch.equal(out_c[1], out_c[2])
    for c, r in zip(out_c, out_r):
        torch.testing.assert_close(c, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_c, g_r, rtol=1e-6, atol=1e-6)
    assert torch.equal(after_c, after_r)


def _assert_same_as_torch(n: int, p: float, seed: int) -> None:
    torch.manual_seed(seed)
    ref = torch.empty(n).bernoulli_(p)
    torch.manual_seed(seed)
    assert torch.equal(B.bernoulli_(torch.empty(n), p), ref)


def test_without_the_kernel_every_call_is_torchs_draw(monkeypatch, tmp_path):
    native.clear()
    monkeypatch.setenv("TDMPC2_NATIVE_KERNELS", "0")
    try:
        assert not B.fast_bernoulli_available()
        _assert_same_as_torch(1000, 0.6, seed=2)
    finally:
        native.clear()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    native.clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TDMPC2_CACHE_DIR", str(tmp_path / "cache"))
    try:
        with pytest.warns(RuntimeWarning, match="could not build the bernoulli kernel"):
            assert not B.fast_bernoulli_available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _assert_same_as_torch(777, 0.5, seed=4)
        assert not list((tmp_path / "cache").glob("*.so"))
    finally:
        native.clear()


def test_a_fresh_cache_folder_gets_a_working_build(monkeypatch, tmp_path):
    if not _compiler_present():
        pytest.skip("no C compiler on this machine")
    native.clear()
    monkeypatch.setenv("TDMPC2_CACHE_DIR", str(tmp_path))
    try:
        assert B.fast_bernoulli_available()
        assert len(list(tmp_path.glob("bernoulli_*.so"))) == 1
        _assert_same_as_torch(5000, 0.99, seed=8)
    finally:
        native.clear()


def test_kernel_ranges_are_named_only_while_a_profiler_runs():
    """`native.profiled` names the C kernels' calls for the profiler (the benchmark's
    breakdown reads them) and costs nothing otherwise."""
    import contextlib

    from torch.profiler import profile

    assert isinstance(native.profiled("tdmpc2::x"), contextlib.nullcontext)
    with profile() as prof:
        with native.profiled("tdmpc2::x"):
            torch.ones(3).sum()
    assert "tdmpc2::x" in {e.key for e in prof.key_averages()}
