"""`runners.thread_time`: perf samples put in the right category, shares that add up, and
(where perf can attach here) a GEMM-bound call that shows up as GEMM time."""

from __future__ import annotations

import pytest
import torch

from runners import thread_time
from runners.thread_time import classify, summarize_samples

TORCH = "/venv/lib/python3.11/site-packages/torch/lib/"


@pytest.mark.parametrize("symbol, dso, category", [
    ("mkl_blas_def_sgemm_kernel_0_zen", TORCH + "libtorch_cpu.so", "gemm_kernels"),
    ("mkl_blas_def_xsgemv", TORCH + "libtorch_cpu.so", "gemm_kernels"),
    ("mkl_blas_def_sgemm_scopy_down16_bdz", TORCH + "libtorch_cpu.so", "gemm_packing"),
    ("mkl_blas_def_sgemm_mscale", TORCH + "libtorch_cpu.so", "gemm_packing"),
    ("0x000000000001de62", TORCH + "libgomp.so.1", "openmp_wait"),
    ("lna_backward._omp_fn.0", "/root/.cache/tdmpc2-gin/layer_norm_act_c15a.so", "fused_kernels"),
    ("tdmpc2_bernoulli", "/root/.cache/tdmpc2-gin/bernoulli_0847.so", "random_draws"),
    ("at::native::(anonymous namespace)::normal_kernel", TORCH + "libtorch_cpu.so",
     "random_draws"),
    ("kernel._omp_fn.0", "/tmp/torchinductor_root/4b/c4b2sp.main.so", "compiled_kernels"),
    ("at::native::adam_fused_step_impl<float>", TORCH + "libtorch_cpu.so", "optimizer_ema"),
    ("lerp_scalar_kernel", TORCH + "libtorch_cpu.so", "optimizer_ema"),
    ("direct_copy_kernel", TORCH + "libtorch_cpu.so", "other_aten"),
    ("_PyEval_EvalFrameDefault", "/usr/lib/libpython3.11.so.1.0", "python_dispatch"),
    ("torch::FunctionSignature::parse", TORCH + "libtorch_python.so", "python_dispatch"),
    ("c10::impl::OperatorEntry::lookup", TORCH + "libc10.so", "python_dispatch"),
    ("_int_malloc", "/usr/lib/x86_64-linux-gnu/libc.so.6", "system"),
    ("clear_page_erms", "[kernel.kallsyms]", "system"),
    ("__powf_fma", "/usr/lib/x86_64-linux-gnu/libm.so.6", "other"),
])
def test_classify_puts_each_sample_in_its_category(symbol, dso, category):
    assert classify(symbol, dso) == category


def test_summarize_splits_the_main_thread_from_all_threads():
    lines = [
        "   100  7f5013826df8 mkl_blas_def_sgemm_kernel_0_zen (" + TORCH + "libtorch_cpu.so)",
        "   100  7f5013826df8 mkl_blas_def_sgemm_kernel_0_zen (" + TORCH + "libtorch_cpu.so)",
        "   100  7f501dd990ac dict_get (/usr/lib/libpython3.11.so.1.0)",
        "   101  7f5013826df8 mkl_blas_def_sgemm_kernel_0_zen (" + TORCH + "libtorch_cpu.so)",
        "   101  1de62 0x000000000001de62 (" + TORCH + "libgomp.so.1)",
        "   101  1de62 0x000000000001de62 (" + TORCH + "libgomp.so.1)",
        "not a sample line",
    ]
    out = summarize_samples(lines, main_tid=100)
    assert out["main_samples"] == 3 and out["all_samples"] == 6 and out["threads"] == 2
    assert out["main"]["gemm_kernels"] == pytest.approx(2 / 3)
    assert out["main"]["python_dispatch"] == pytest.approx(1 / 3)
    assert out["all"]["gemm_kernels"] == pytest.approx(3 / 6)
    assert out["all"]["openmp_wait"] == pytest.approx(2 / 6)
    for who in ("main", "all"):
        assert set(out[who]) == set(thread_time.THREAD_KEYS)
        assert sum(out[who].values()) == pytest.approx(1.0)


def test_sampling_a_matmul_loop_finds_the_gemm():
    """The real thing: perf attached to this process while it multiplies matrices."""
    reason = thread_time.unavailable()
    if reason:
        pytest.skip(reason)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out = thread_time.sample_calls(lambda: [torch.mm(a, b) for _ in range(20)], repeats=5)
    assert out["calls"] == 5 and out["seconds"] > 0 and out["main_samples"] > 20
    assert sum(out["main"].values()) == pytest.approx(1.0)
    main = out["main"]
    assert main["gemm_kernels"] + main["gemm_packing"] > 0.5, main
    assert main["gemm_kernels"] > main["gemm_packing"]


def test_unavailable_names_the_missing_piece(monkeypatch):
    monkeypatch.setattr(thread_time.shutil, "which", lambda name: None)
    assert "perf tool is not installed" in thread_time.unavailable()
    with pytest.raises(RuntimeError, match="perf tool is not installed"):
        thread_time.sample_calls(lambda: None, 1)
