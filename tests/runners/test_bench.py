"""`python -m runners.bench`: the figures it prints are measured and counted, not assumed.

Nothing here asserts a speed (timed assertions flake on shared machines); the tests check
that the FLOP counts are real counts, that the end-to-end shares add up, and that bad
input fails cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runners import bench

pytest.importorskip("envpool")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--gin_file=gin/tdmpc2_dog.gin", "--gin_file=gin/test/tiny.gin",
        "--gin_param=TASK = 'cartpole-balance'"]


def _bench(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "runners.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_count_flops_counts_matrix_products_forward_and_backward():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    assert bench.count_flops(lambda: lin(x)) == 2 * 16 * 64 * 32
    # backward: grad wrt input and wrt weight, one matmul each
    assert bench.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 16 * 64 * 32


def _ran_compiled(fn) -> bool:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return any("Compiled" in e.name for e in prof.events())


def test_count_flops_leaves_compiled_code_compiled():
    lin = torch.nn.Linear(64, 32)
    fn = torch.compile(lambda x: torch.nn.functional.mish(lin(x)))
    x = torch.randn(16, 64)
    fn(x)
    assert _ran_compiled(lambda: fn(x))
    assert bench.count_flops(lambda: fn(x)) == 2 * 16 * 64 * 32
    # Later timings must still measure the compiled code, not an eager fallback.
    assert _ran_compiled(lambda: fn(x))


def test_categorize_puts_operators_in_their_category():
    assert bench.categorize("aten::addmm") == "matrix_products"
    assert bench.categorize("aten::baddbmm") == "matrix_products"
    assert bench.categorize("aten::bernoulli_") == "random_draws"
    assert bench.categorize("tdmpc2::bernoulli_") == "random_draws"  # rlcore.bernoulli
    assert bench.categorize("tdmpc2::randn") == "random_draws"  # rlcore.draws
    assert bench.categorize("## Call CompiledFxGraph fabc ##") == "compiled_kernels"
    assert bench.categorize("tdmpc2::layer_norm_mish_backward") == "compiled_kernels"
    assert bench.categorize("aten::_fused_adam_") == "optimizer_ema"
    assert bench.categorize("aten::lerp_") == "optimizer_ema"
    assert bench.categorize("aten::native_layer_norm") == "other_ops"


def test_time_breakdown_attributes_a_call_to_its_operators():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256)

    def fn():
        h = torch.nn.functional.dropout(lin(x), 0.1, training=True)
        return torch.nn.functional.layer_norm(h, h.shape[-1:])

    flops = bench.count_flops(fn)
    assert flops == 2 * 512 * 256 * 256
    b = bench.time_breakdown(fn, flops=flops, matmul_gflops=100.0, repeats=2)
    assert set(b["ms"]) == set(bench.BREAKDOWN_KEYS)
    assert b["ms"]["matrix_products"] > 0 and b["ms"]["random_draws"] > 0
    assert b["ms"]["other_ops"] > 0  # layer norm, the dropout's multiply
    assert b["ms"]["compiled_kernels"] == 0 and b["ms"]["optimizer_ema"] == 0
    assert sum(b["ms"].values()) == pytest.approx(b["profiled_ms"])
    assert sum(b["share"].values()) == pytest.approx(1.0)
    assert b["matrix_gflops_per_s"] == pytest.approx(
        flops / (b["ms"]["matrix_products"] / 1e3) / 1e9)
    assert b["matrix_fraction_of_matmul"] == pytest.approx(b["matrix_gflops_per_s"] / 100.0)
    assert b["executed_matrix_flops"] == pytest.approx(flops)


def test_breakdown_notes_when_a_compiled_call_runs_fewer_flops_than_counted():
    """A compiled graph can merge work eager mode repeats (common subexpressions): the
    report then says that the part's rates rest on more FLOPs than it ran."""
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64)

    @torch.compile
    def loss(x):
        with torch.no_grad():
            target = lin(x) + lin(x)
        return (lin(x) * target).sum()  # the three Linears merge into one when compiled

    def step():
        loss(x).backward()

    step()
    product = 2 * 16 * 64 * 32
    counted = bench.count_flops(step)
    assert counted == 4 * product  # eager: three forwards and the weight gradient
    b = bench.time_breakdown(step, flops=counted, matmul_gflops=1.0, repeats=2)
    assert b["executed_matrix_flops"] == pytest.approx(counted / 2)
    lines = bench._format_breakdowns({"part": {"flops": counted, "breakdown": b}})
    assert any(line.startswith("note: part ran 0.00 GFLOP") and "+100.0%" in line
               for line in lines)
    b["executed_matrix_flops"] = counted
    assert not any(line.startswith("note:") for line in
                   bench._format_breakdowns({"part": {"flops": counted, "breakdown": b}}))


def test_time_breakdown_sees_compiled_kernels_and_leaves_them_compiled():
    lin = torch.nn.Linear(64, 32)
    fn = torch.compile(lambda x: torch.nn.functional.mish(lin(x)))
    x = torch.randn(16, 64)
    fn(x)
    b = bench.time_breakdown(lambda: fn(x), flops=2 * 16 * 64 * 32, matmul_gflops=1.0,
                             repeats=2)
    assert b["ms"]["compiled_kernels"] > 0
    assert _ran_compiled(lambda: fn(x))


def test_summarize_reports_median_and_spread():
    s = bench.summarize([0.001 * i for i in range(1, 12)])  # 1..11 ms
    assert s["median_ms"] == pytest.approx(6.0)
    assert s["p10_ms"] == pytest.approx(2.0) and s["p90_ms"] == pytest.approx(10.0)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(11.0)
    assert s["n"] == 11


def test_matmul_reference_is_a_positive_rate():
    r = bench.matmul_reference(torch.device("cpu"), n=128, repeats=3)
    assert r["flops"] == 2 * 128 ** 3 and r["size"] == 128 and r["gflops_per_s"] > 0


def test_interleaved_timing_alternates_the_part_and_the_matmul():
    calls = []
    mm = bench.Matmul(torch.device("cpu"), n=64)

    def matmul():
        calls.append("mm")
        mm()

    fn_times, mm_times = bench.time_interleaved(lambda: calls.append("fn"), matmul, 3,
                                                torch.device("cpu"), warmup=1)
    assert len(fn_times) == len(mm_times) == 3
    assert calls == ["fn", "mm"] + ["mm", "fn"] * 3


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = _bench(*TINY, f"--out={out}", "--envs=1,4", "--repeats=3", "--sample_repeats=5",
                  "--seed_steps=100", "--pretrain_updates=2", "--e2e_steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_reports_every_part(tiny_bench):
    result, stdout = tiny_bench
    for part in ("plan_E1", "plan_E4", "update", "replay_sample", "env_step_E1", "env_step_E4"):
        assert result[part]["median_ms"] > 0, part
        assert result[part]["p10_ms"] <= result[part]["median_ms"] <= result[part]["p90_ms"]
        assert f"| {part} |" in stdout
    assert result["matmul"]["gflops_per_s"] > 0
    assert "fp32 matmul reference" in stdout and "end-to-end:" in stdout
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch"]
    mem = result["memory"]
    # tiny cartpole: 5 obs + 1 action + reward (float32), terminated (bool), episode (int64)
    assert mem["replay_bytes_per_step"] == 4 * 5 + 4 * 1 + 4 + 1 + 8
    assert mem["peak_rss_bytes"] > 0


def test_planning_flops_are_counted_and_scale_with_envs(tiny_bench):
    result, _ = tiny_bench
    f1, f4 = result["plan_E1"]["flops"], result["plan_E4"]["flops"]
    assert f1 > 0 and f4 == 4 * f1  # every planning matmul is batched over the E envs
    assert result["update"]["flops"] > 0
    for part in ("plan_E1", "update"):
        r = result[part]
        assert r["gflops_per_s"] == pytest.approx(r["flops"] / r["median_ms"] * 1e-6)
        assert r["matmul_gflops_per_s"] > 0
        assert r["matmul_fraction"] == pytest.approx(r["gflops_per_s"] / r["matmul_gflops_per_s"])
        pair = r["matmul_fraction_paired"]
        assert pair["n"] == result["args"]["repeats"]
        assert 0 < pair["p10"] <= pair["median"] <= pair["p90"]


def test_paired_fractions_cancel_a_drifting_machine():
    """A machine that slows down 4x during the run slows both members of each pair alike:
    the paired ratio stays exact, while the ratio of the medians depends on where the
    medians fall."""
    from runners.bench import paired_fractions

    mm = [1.0, 2.0, 4.0, 4.0, 4.0]  # matmul call times, the machine slowing down
    part = [0.5, 1.0, 2.0, 2.0, 2.0]  # a part that always takes half the matmul's time
    pair = paired_fractions(part, mm, flops=100, mm_flops=100)
    assert pair == {"median": 2.0, "p10": 2.0, "p90": 2.0, "n": 5}
    drifted = paired_fractions([0.5, 1.0, 2.0], [1.0, 1.0, 1.0], flops=100, mm_flops=100)
    assert drifted["median"] == 1.0 and drifted["p10"] < 1.0 < drifted["p90"]


def test_bench_breaks_planning_and_update_time_down(tiny_bench):
    result, stdout = tiny_bench
    for part in ("plan_E1", "plan_E4", "update"):
        b = result[part]["breakdown"]
        assert sum(b["share"].values()) == pytest.approx(1.0)
        assert b["ms"]["matrix_products"] > 0 and b["matrix_gflops_per_s"] > 0
        assert f"| {part} | {b['profiled_ms']:.1f} |" in stdout
    assert result["update"]["breakdown"]["ms"]["optimizer_ema"] > 0  # Adam and the EMA
    assert "breakdown" not in result["replay_sample"]
    assert "Where the time goes" in stdout


def test_table_says_why_a_part_was_not_profiled(tiny_bench):
    """With C++ graph wrappers (`TDMPC2Agent.compile_cpp_wrapper`) the profiler sees whole
    graphs only, so the bench skips the breakdown and says so instead of printing zeros."""
    result, _ = tiny_bench
    result = {k: ({kk: vv for kk, vv in v.items() if kk != "breakdown"}
                  if isinstance(v, dict) else v) for k, v in result.items()}
    assert "Where the time goes" not in bench.format_table(result)
    result["breakdown_note"] = "not profiled: why"
    assert "Where the time goes: not profiled: why." in bench.format_table(result)


def test_end_to_end_shares_cover_the_wall_time(tiny_bench):
    result, _ = tiny_bench
    e2e = result["end_to_end"]
    assert e2e["env_steps"] == 20 * 2  # agent steps x action repeat, past seeding
    assert e2e["env_steps_per_second"] > 0 and e2e["updates"] > 0
    assert sum(e2e["share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert e2e["share"]["plan"] > 0 and e2e["share"]["update"] > 0 and e2e["share"]["env"] > 0


@pytest.mark.parametrize("args, message", [
    (["--envs=0"], "--envs"),
    (["--repeats=0"], "--repeats"),
    (["--breakdown_repeats=-1"], "--breakdown_repeats"),
    (["--thread_repeats=-1"], "--thread_repeats"),
    (["--gin_param=OnlineRunner.no_such_thing = 1"], "no_such_thing"),
])
def test_bad_input_fails_with_one_clear_error(tmp_path, args, message):
    out = tmp_path / "bench.json"
    proc = _bench(*TINY, f"--out={out}", *args, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not out.exists()


def test_bench_clocks_the_fused_kernels_and_the_ceiling_without_them(tiny_bench):
    """On CPU the bench reports the wall time inside the fused LayerNorm kernels per call
    and the paired ratio to the matmul the rest of the call reaches; the ceiling is
    above the part's own ratio by the kernels' share."""
    from components import fused

    if not fused.fused_available():
        pytest.skip("no fused kernels here (no C compiler)")
    result, stdout = tiny_bench
    for part in ("plan_E1", "plan_E4", "update"):
        k = result[part]["fused_kernels"]
        assert k["calls"] > 0 and k["median_ms"] > 0 and 0 < k["share"] < 1
        assert k["median_ms"] < result[part]["p90_ms"]
        without = k["matmul_fraction_without_paired"]
        assert without["n"] == result["args"]["repeats"]
        assert without["median"] > result[part]["matmul_fraction_paired"]["median"]
        assert f"| {part} | {k['calls']} | {k['median_ms']:.2f} |" in stdout
    assert "fused_kernels" not in result["replay_sample"]
    assert "Inside the fused LayerNorm kernels" in stdout


def test_bench_samples_thread_time_or_says_why_not(tiny_bench):
    """Where perf can attach, each timed part gets a thread-time split whose shares add up
    (main thread and all threads); elsewhere the table says why there is none."""
    from runners import thread_time

    result, stdout = tiny_bench
    reason = thread_time.unavailable()
    if reason:
        assert f"Thread time: not sampled ({reason})" in stdout
        return
    for part in ("plan_E1", "plan_E4", "update"):
        t = result[part]["thread_time"]
        assert t["calls"] == result["args"]["thread_repeats"] and t["main_samples"] > 0
        for who in ("main", "all"):
            assert sum(t[who].values()) == pytest.approx(1.0)
        assert f"| {part} | main | {t['main_samples']} |" in stdout
    assert "thread_time" not in result["replay_sample"]
    assert "Thread time (perf samples" in stdout


def test_fused_kernel_figures_take_the_kernels_out_of_each_call():
    from components.fused import KernelTime
    from runners.bench import fused_kernel_figures

    def clock(calls, seconds):
        c = KernelTime()
        c.calls, c.seconds = calls, seconds
        return c

    figures = fused_kernel_figures([1.0, 2.0], [clock(3, 0.5), clock(3, 1.0)], [1.0, 2.0],
                                   flops=100, mm_flops=100)
    assert figures["calls"] == 3 and figures["share"] == 0.5
    assert figures["median_ms"] == pytest.approx(750.0)
    assert figures["matmul_fraction_without_paired"]["median"] == pytest.approx(2.0)
    assert fused_kernel_figures([1.0], [clock(0, 0.0)], [1.0], 100, 100) is None
