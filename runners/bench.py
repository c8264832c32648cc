"""Speed benchmark: `python -m runners.bench [--gin_file=gin/tdmpc2_dog.gin] [--out=bench.json]`.

One run reports, for a gin config (default: dog-run, 5M model, paper planner settings):

- median and spread (p10-p90) of one planning call for E = 1 and E = 8 envs (observation
  in, action out: encode + plan), one update (batch from the config, 256 by default), one
  replay sample and one env step;
- end-to-end env steps/s of online training past seeding and pretraining, with the share
  of wall time in env, planning, updates, replay, logging and the rest;
- the FLOPs one planning call and one update need, counted by `torch.utils.flop_counter`
  (matrix products: linear layers, batched ensemble matmuls and convolutions, forward and
  backward; elementwise work is not counted), the achieved GFLOP/s, and a plain fp32
  matmul's GFLOP/s measured in the same run, so efficiency is a ratio that survives a
  noisy machine (the ratio of the two medians, and the median of call-by-call ratios,
  each call against the matmul call timed just before it);
- peak memory (RSS; CUDA memory on a GPU) and replay bytes per stored step;
- on CPU, the wall time inside the fused LayerNorm -> Mish / SimNorm kernels
  (`components.fused.kernel_time`, clocked around each kernel call during the timed calls,
  no profiler) and the ratio to the matmul that the rest of each call would reach without
  them: the ceiling that faster kernels could approach;
- on CPU where Linux `perf` can attach, where each part's thread time goes by sampling
  (`runners.thread_time`: the BLAS kernels' arithmetic apart from their operand packing,
  the fused and compiled kernels, Python and dispatch, threads waiting in OpenMP), for
  the main thread (its shares split the wall time) and all threads, with no profiler in
  the calls.

The table goes to stdout, everything to a JSON file. Figures only: nothing here asserts a
speed. The end-to-end phase trains for real (a short seeding phase and a few pretraining
updates first, see the flags) in a temporary run directory that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from components import fused
from rlcore import gemm
from rlcore.config import load_gin
from runners import common, thread_time

DEFAULT_GIN = "gin/tdmpc2_dog.gin"
_log = logging.getLogger("runners")


# -- measuring --------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, device: torch.device, *,
               warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` (after `warmup` untimed ones)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median and spread (p10, p90, min, max) of timings, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p10_ms": q[0], "p90_ms": q[8],
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as counted by torch's FlopCounterMode (matrix products,
    forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    # Counted on the eager code: tracing compiled functions under the counter's dispatch
    # mode and module hooks makes dynamo skip their frames for good, so everything timed
    # after the count would silently run eager.
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class Matmul:
    """A plain fp32 [n, n] @ [n, n] matmul on `device` (2 n^3 FLOPs a call)."""

    def __init__(self, device: torch.device, n: int = 2048):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device)
        self.b = torch.randn(n, n, generator=g).to(device)
        self.out = torch.empty(n, n, device=device)
        self.n, self.flops, self.device = n, 2 * n ** 3, device

    def __call__(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def rate(self, times: Sequence[float]) -> dict[str, Any]:
        return {**summarize(times), "size": self.n, "flops": self.flops,
                "gflops_per_s": self.flops / statistics.median(times) / 1e9}


def matmul_reference(device: torch.device, *, n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """GFLOP/s of a plain fp32 [n, n] @ [n, n] matmul on `device`; where the Linear layers
    take oneDNN (CPU, see `rlcore.gemm`) also that of the same product on oneDNN
    (`onednn_gflops_per_s`), which can be faster than the plain matmul."""
    mm = Matmul(device, n)
    out = mm.rate(time_calls(mm, repeats, device, warmup=2))
    wt = mm.b.t().contiguous()
    if device.type == "cpu" and gemm.uses_onednn(mm.a, wt):
        dnn = time_calls(lambda: gemm.linear(mm.a, wt), repeats, device, warmup=2)
        out["onednn_gflops_per_s"] = mm.flops / statistics.median(dnn) / 1e9
    return out


def time_interleaved(fn: Callable[[], Any], matmul: Matmul, repeats: int,
                     device: torch.device, *, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Times of `fn` and of the reference matmul, alternating call by call, so both see
    the same machine (a shared machine's speed drifts within a run)."""
    for _ in range(warmup):
        fn()
    matmul()
    fn_times, mm_times = [], []
    for _ in range(repeats):
        mm_times += time_calls(matmul, 1, device, warmup=0)
        fn_times += time_calls(fn, 1, device, warmup=0)
    return fn_times, mm_times


# Operators (profiler event names) of each category of `time_breakdown`. Matrix products
# are the operators FlopCounterMode counts, so their time and the counted FLOPs match.
MATRIX_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
    "aten::_addmm_activation", "aten::mkldnn_convolution", "aten::convolution_backward",
    "aten::_scaled_mm", "mkldnn::_linear_pointwise"})  # the last: rlcore.gemm's oneDNN
RANDOM_OPS = frozenset({
    "aten::bernoulli_", "aten::bernoulli", "aten::normal_", "aten::uniform_",
    "aten::randperm", "aten::random_", "aten::multinomial", "aten::exponential_",
    "tdmpc2::bernoulli_",  # rlcore.bernoulli's draw, as compiled graphs call it
    "tdmpc2::randn", "tdmpc2::randperm", "tdmpc2::randint", "tdmpc2::multinomial"})
# (the last four: rlcore.draws, as compiled CPU graphs call them)
COMPILED_PREFIXES = ("## Call CompiledFxGraph", "graph_", "cpp_fused", "triton_",
                     "tdmpc2::layer_norm_")  # components.fused's C kernels
OPTIMIZER_PREFIXES = ("aten::_fused_adam", "aten::_foreach_", "aten::lerp", "Optimizer.")
BREAKDOWN_KEYS = ("matrix_products", "random_draws", "compiled_kernels", "optimizer_ema",
                  "other_ops", "unattributed")


def categorize(name: str) -> str:
    """The `time_breakdown` category of one profiler event name."""
    if name in MATRIX_OPS:
        return "matrix_products"
    if name in RANDOM_OPS:
        return "random_draws"
    if name.startswith(COMPILED_PREFIXES):
        return "compiled_kernels"
    if name.startswith(OPTIMIZER_PREFIXES):
        return "optimizer_ema"
    return "other_ops"


def _product_flops(name: str, shapes: list) -> int | None:
    """2mkn (times the batch) of one matrix-product event from its input shapes."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name in ("aten::addmm", "aten::_addmm_activation"):
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2 * b * m * k * n
        if name in ("aten::baddbmm", "aten::addbmm"):
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2 * b * m * k * n
        if name == "mkldnn::_linear_pointwise":  # x [..., in] @ w[out, in]^T
            return 2 * math.prod(shapes[0]) * shapes[1][0]
    except (ValueError, TypeError, IndexError):
        return None
    return None


def executed_matrix_flops(fn: Callable[[], Any]) -> int | None:
    """FLOPs the matrix products of one call of `fn` really ran, from the profiled input
    shapes, with compiled code left compiled (`count_flops` counts the eager program, and
    a compiled graph that merges repeated work runs fewer); None where an operator's
    FLOPs cannot be read from its shapes (convolutions)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    total = 0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in MATRIX_OPS:
            flops = _product_flops(e.key, e.input_shapes)
            if flops is None:
                return None
            total += flops * e.count
    return total


def time_breakdown(fn: Callable[[], Any], *, flops: int, matmul_gflops: float,
                   repeats: int = 3) -> dict[str, Any]:
    """Where one call of `fn` spends its CPU time, from a profile of `repeats` calls.

    Each operator's self time goes to one category (`categorize`): matrix products,
    random draws, compiled kernels (inductor's and their wrappers,
    `components.fused`'s C kernel), optimizer steps and EMA,
    and other operators; `unattributed` is wall time outside any operator (Python,
    dispatch). Profiling slows the calls down, so the figures are ms per profiled call and
    shares of it. The matrix products' own rate is `flops` over their time, and its ratio
    to the matmul reference says how far they are from the machine's GEMM speed.
    `executed_matrix_flops` is what one more call's products really ran (see
    `executed_matrix_flops`).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        wall = (time.perf_counter() - t0) / repeats
    ms = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
    for e in prof.key_averages():
        ms[categorize(e.key)] += e.self_cpu_time_total / 1e3 / repeats
    ms["unattributed"] = max(0.0, wall * 1e3 - sum(ms.values()))
    total = sum(ms.values())
    mat_s = ms["matrix_products"] / 1e3
    mat_gflops = flops / mat_s / 1e9 if mat_s > 0 else 0.0
    return {"profiled_ms": total, "ms": ms, "share": {k: v / total for k, v in ms.items()},
            "executed_matrix_flops": executed_matrix_flops(fn),
            "matrix_gflops_per_s": mat_gflops,
            "matrix_fraction_of_matmul": mat_gflops / matmul_gflops if matmul_gflops else 0.0,
            "repeats": repeats}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.run(
            # "-dirty" when the working tree has uncommitted changes
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def paired_fractions(times: Sequence[float], mm_times: Sequence[float], flops: int,
                     mm_flops: int) -> dict[str, float]:
    """Each call's GFLOP/s over that of the matmul call timed just before it: median and
    p10-p90 of those ratios. A shared machine's speed drifts over seconds; a call and its
    neighbour see the same speed, so the pairs cancel drifts that the ratio of the two
    medians (taken over the whole window) does not."""
    ratios = sorted(flops * m / (t * mm_flops) for t, m in zip(times, mm_times))
    q = (statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1
         else [ratios[0]] * 9)
    return {"median": statistics.median(ratios), "p10": q[0], "p90": q[8], "n": len(ratios)}


def fused_kernel_figures(times: Sequence[float], clocked: Sequence[Any],
                         mm_times: Sequence[float], flops: int,
                         mm_flops: int) -> dict[str, Any] | None:
    """The fused kernels' share of each timed call (`clocked`: `fused.KernelTime` per
    call) and `paired_fractions` of the calls with that time taken out; None when no
    kernel ran (a GPU, other dtypes, no C compiler)."""
    if not clocked or not all(c.calls for c in clocked):
        return None
    kernel_s = [c.seconds for c in clocked]
    rest = [max(t - k, 1e-9) for t, k in zip(times, kernel_s)]
    return {"calls": clocked[0].calls,
            "median_ms": statistics.median(kernel_s) * 1e3,
            "share": statistics.median(k / t for k, t in zip(kernel_s, times)),
            "matmul_fraction_without_paired": paired_fractions(rest, mm_times, flops,
                                                               mm_flops)}


def _with_rate(timing: dict[str, float], flops: int, matmul_gflops: float,
               paired: dict[str, float] | None = None) -> dict[str, Any]:
    """Achieved GFLOP/s and its fraction of the matmul GFLOP/s measured alongside (the
    ratio of the medians, and the call-by-call `paired_fractions` when given)."""
    gflops = flops / (timing["median_ms"] / 1e3) / 1e9
    out = {**timing, "flops": flops, "gflops_per_s": gflops,
           "matmul_gflops_per_s": matmul_gflops, "matmul_fraction": gflops / matmul_gflops}
    if paired is not None:
        out["matmul_fraction_paired"] = paired
    return out


# -- the benchmark ----------------------------------------------------------------------
def _random_obs(spec, E: int, device) -> torch.Tensor:
    if spec.obs_type == "pixels":
        return torch.randint(0, 256, (E, *spec.obs_shape), dtype=torch.uint8)
    return torch.randn(E, *spec.obs_shape)


def _end_to_end(runner, agent_steps: int) -> dict[str, Any] | None:
    """Seed, pretrain, then `agent_steps` agent steps of online training; throughput of
    the part after pretraining."""
    spec = runner.spec
    # One untimed planning call first, so one-off work (torch.compile, when switched on)
    # is not counted as steady-state training time.
    runner.agent.act(_random_obs(spec, spec.num_envs, runner.device),
                     torch.ones(spec.num_envs, dtype=torch.bool))
    runner.total_env_steps = (runner.seed_steps + agent_steps) * spec.action_repeat
    runner.run()
    return runner.throughput()


def run_bench(*, repeats: int, envs: Sequence[int], e2e_agent_steps: int,
              sample_repeats: int, run_dir: str,
              breakdown_repeats: int = 3, thread_repeats: int = 3) -> dict[str, Any]:
    from runners.pipelines import OnlineRunner

    runner = OnlineRunner(run_dir)
    agent, replay, spec, device = runner.agent, runner.replay, runner.spec, runner.device
    result: dict[str, Any] = {"machine": machine_info(device)}
    result["config"] = {
        "task": getattr(spec, "task", None) or getattr(runner.env, "task", None),
        "obs_shape": list(spec.obs_shape), "action_dim": spec.action_dim,
        "model_parameters": sum(p.numel() for p in agent.model.parameters()
                                if p.requires_grad),
        "planner": type(agent.planner).__name__,
        "planner_iterations": agent.planner.iterations,
        "num_samples": agent.planner.num_samples, "horizon": agent.planner.horizon,
        "batch_size": replay.batch_size, "aux_discounts": agent.model.aux_discounts.tolist(),
        "seed_steps": runner.seed_steps, "pretrain_updates": runner.pretrain_updates,
    }
    _log.info("bench: matmul reference")
    mm_before = matmul_reference(device, repeats=repeats)

    # End-to-end first: it also fills the replay with real episodes for the parts below.
    result["end_to_end"] = None
    if e2e_agent_steps > 0:
        _log.info("bench: end-to-end (%d seed steps, %d pretraining updates, %d agent steps)",
                  runner.seed_steps, runner.pretrain_updates, e2e_agent_steps)
        result["end_to_end"] = _end_to_end(runner, e2e_agent_steps)
    else:  # still need data for the update and sample figures
        runner.total_env_steps = runner.seed_steps * spec.action_repeat
        runner.pretrain_updates = 0
        runner.run()

    parts: dict[str, Any] = {}
    matmul = Matmul(device)
    interleaved_mm: list[float] = []

    breakdowns: dict[str, Any] = {}
    paired: dict[str, dict[str, float]] = {}
    # The breakdown attributes CPU time by operator: on a GPU that would be launch time.
    # C++ graph wrappers call the operators past the profiler (only whole graphs show).
    cpp_wrappers = getattr(agent, "compile_cpp_wrapper", False)
    profile_parts = breakdown_repeats > 0 and device.type == "cpu" and not cpp_wrappers
    if breakdown_repeats > 0 and cpp_wrappers:
        result["breakdown_note"] = ("not profiled: with TDMPC2Agent.compile_cpp_wrapper the "
                                    "graphs' C++ wrappers call the operators out of the "
                                    "profiler's sight")

    kernels: dict[str, dict[str, Any]] = {}
    threads: dict[str, dict[str, Any]] = {}
    sample_threads = thread_repeats > 0 and device.type == "cpu"
    if sample_threads and (reason := thread_time.unavailable()):
        result["thread_time_note"] = reason
        sample_threads = False

    def measure(fn, name):
        clocked: list[fused.KernelTime] = []

        def call():
            with fused.kernel_time() as clock:
                fn()
            clocked.append(clock)

        times, mm_times = time_interleaved(call, matmul, repeats, device, warmup=2)
        interleaved_mm.extend(mm_times)
        flops, mm_rate = count_flops(fn), matmul.rate(mm_times)["gflops_per_s"]
        if profile_parts:
            breakdowns[name] = time_breakdown(fn, flops=flops, matmul_gflops=mm_rate,
                                              repeats=breakdown_repeats)
        if sample_threads:
            try:
                threads[name] = thread_time.sample_calls(fn, thread_repeats)
            except RuntimeError as e:
                result["thread_time_note"] = str(e)
        paired[name] = paired_fractions(times, mm_times, flops, matmul.flops)
        kernels[name] = fused_kernel_figures(times, clocked[-len(times):], mm_times, flops,
                                             matmul.flops)
        return times, flops, mm_rate

    for E in envs:
        _log.info("bench: planning, E=%d", E)
        obs = _random_obs(spec, E, device)
        is_first = torch.zeros(E, dtype=torch.bool)
        agent.act(obs, torch.ones(E, dtype=torch.bool))  # warm start in place
        parts[f"plan_E{E}"] = measure(functools.partial(agent.act, obs, is_first),
                                      f"plan_E{E}")
    _log.info("bench: update")
    batch = replay.sample()
    parts["update"] = measure(functools.partial(agent.update, batch), "update")
    _log.info("bench: replay sample and env steps")
    parts["replay_sample"] = (time_calls(replay.sample, sample_repeats, device), None, None)
    env_results = {}
    for E in envs:
        env = runner.env_factory(num_envs=E, seed=runner.seed + 7)
        env.reset()
        action = torch.rand(E, spec.action_dim) * 2 - 1
        env_results[f"env_step_E{E}"] = (time_calls(functools.partial(env.step, action),
                                                    sample_repeats, device), None, None)
        env.close()
    parts.update(env_results)
    mm_after = matmul_reference(device, repeats=repeats)
    result["matmul"] = {**matmul.rate(interleaved_mm), "before": mm_before, "after": mm_after}
    for name, (times, flops, mm_gflops) in parts.items():
        timing = summarize(times)
        result[name] = (_with_rate(timing, flops, mm_gflops, paired.get(name)) if flops
                        else timing)
    for name, breakdown in breakdowns.items():
        result[name]["breakdown"] = breakdown
    for name, figures in threads.items():
        result[name]["thread_time"] = figures
    for name, figures in kernels.items():
        if figures is not None:
            result[name]["fused_kernels"] = figures
    for E in envs:
        result[f"env_step_E{E}"]["env_steps_per_second"] = (
            E * spec.action_repeat / (result[f"env_step_E{E}"]["median_ms"] / 1e3))
    row_bytes = replay.bytes_per_row
    result["memory"] = {
        "peak_rss_bytes": peak_rss_bytes(),
        "replay_bytes_per_step": row_bytes,
        "replay_capacity_rows": replay.capacity,
        "replay_allocated_bytes": row_bytes * replay.capacity,
    }
    if device.type == "cuda":
        result["memory"]["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["memory"]["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return result


# -- output -----------------------------------------------------------------------------
def _onednn_note(matmul: dict[str, Any]) -> str:
    rates = [r["onednn_gflops_per_s"] for r in (matmul.get("before"), matmul.get("after"))
             if r and "onednn_gflops_per_s" in r]
    if not rates:
        return ""
    return ("; the same product on oneDNN (the CPU Linear layers' library, rlcore.gemm): "
            + " / ".join(f"{r:.1f}" for r in rates) + " GFLOP/s (before / after the parts)")


def format_table(result: dict[str, Any]) -> str:
    m, cfg = result["machine"], result["config"]
    mm = result["matmul"]["gflops_per_s"]
    lines = [
        f"# {cfg['task']}: {cfg['model_parameters'] / 1e6:.2f}M parameters, "
        f"{cfg['planner']} ({cfg['planner_iterations']} iterations x {cfg['num_samples']} "
        f"samples, horizon {cfg['horizon']}), batch {cfg['batch_size']}",
        f"# {m['date']} | {m.get('gpu') or m['cpu']} | {m['device']} | "
        f"{m['torch_threads']} threads | torch {m['torch']} | commit {m.get('commit')}",
        f"# fp32 matmul reference ({result['matmul']['size']}^3, timed alternately with each "
        f"part): {mm:.1f} GFLOP/s median" + _onednn_note(result["matmul"]),
        "",
        "| part | median ms | p10-p90 ms | n | GFLOP/call | GFLOP/s | matmul GFLOP/s "
        "| of matmul | paired (p10-p90) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result.items():
        if not isinstance(r, dict) or "median_ms" not in r or name == "matmul":
            continue
        pair = r.get("matmul_fraction_paired")
        pair_cell = (f"{pair['median']:.0%} ({pair['p10']:.0%}-{pair['p90']:.0%})" if pair
                     else "")
        rate = (f"{r['flops'] / 1e9:.2f} | {r['gflops_per_s']:.1f} | "
                f"{r['matmul_gflops_per_s']:.1f} | {r['matmul_fraction']:.0%} | {pair_cell}"
                if "flops" in r else " | | | | ")
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} "
                     f"| {r['n']} | {rate} |")
    lines += _format_breakdowns(result)
    lines += _format_kernels(result)
    lines += _format_threads(result)
    if result.get("thread_time_note"):
        lines += ["", f"Thread time: not sampled ({result['thread_time_note']})."]
    if result.get("breakdown_note"):
        lines += ["", f"Where the time goes: {result['breakdown_note']}."]
    e2e = result.get("end_to_end")
    lines.append("")
    if e2e:
        share = ", ".join(f"{k} {v:.0%}" for k, v in e2e["share"].items() if v >= 0.005)
        lines.append(f"end-to-end: {e2e['env_steps_per_second']:.1f} env steps/s over "
                     f"{e2e['env_steps']} env steps ({e2e['updates']} updates, "
                     f"{e2e['seconds']:.1f} s); time: {share}")
    else:
        lines.append("end-to-end: not measured")
    mem = result["memory"]
    mem_line = (f"memory: peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB; replay "
                f"{mem['replay_bytes_per_step']} B per stored step "
                f"({mem['replay_allocated_bytes'] / 2**30:.2f} GiB for "
                f"{mem['replay_capacity_rows']:,} rows)")
    if "cuda_peak_allocated_bytes" in mem:
        mem_line += f"; CUDA peak {mem['cuda_peak_allocated_bytes'] / 2**30:.2f} GiB allocated"
    lines.append(mem_line)
    return "\n".join(lines)


def _part_rows(result: dict[str, Any], key: str) -> dict[str, Any]:
    """{part: result[part][key]} for the parts that have `key`."""
    return {name: r[key] for name, r in result.items() if isinstance(r, dict) and r.get(key)}


def _format_breakdowns(result: dict[str, Any]) -> list[str]:
    rows = _part_rows(result, "breakdown")
    if not rows:
        return []
    heads = ["matrix products", "random draws", "compiled kernels", "optimizer, EMA",
             "other ops", "unattributed"]
    lines = ["", "Where the time goes (CPU profile, ms per profiled call and share; the matrix "
                 "products' own GFLOP/s and its ratio to the matmul reference):", "",
             "| part | profiled ms | " + " | ".join(heads) + " | matrix GFLOP/s | of matmul |",
             "| --- | ---: | " + " | ".join("---:" for _ in heads) + " | ---: | ---: |"]
    for name, b in rows.items():
        cells = " | ".join(f"{b['ms'][k]:.1f} ({b['share'][k]:.0%})" for k in BREAKDOWN_KEYS)
        lines.append(f"| {name} | {b['profiled_ms']:.1f} | {cells} | "
                     f"{b['matrix_gflops_per_s']:.1f} | {b['matrix_fraction_of_matmul']:.0%} |")
    for name, b in rows.items():
        counted, executed = result[name].get("flops"), b.get("executed_matrix_flops")
        if counted and executed and abs(executed - counted) > 0.01 * counted:
            lines.append(f"note: {name} ran {executed / 1e9:.2f} GFLOP of matrix products per "
                         f"call, not the {counted / 1e9:.2f} GFLOP counted in eager mode; its "
                         f"GFLOP/s and ratios above are off by {counted / executed - 1:+.1%}")
    return lines


def _format_kernels(result: dict[str, Any]) -> list[str]:
    rows = _part_rows(result, "fused_kernels")
    if not rows:
        return []
    lines = ["", "Inside the fused LayerNorm kernels (components.fused; wall time per call, "
                 "clocked without a profiler) and the ratio to the matmul the rest of the "
                 "call reaches (paired, as above): the ceiling were the kernels free:", "",
             "| part | kernel calls | kernels ms | share of the call | of matmul without them |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, k in rows.items():
        w = k["matmul_fraction_without_paired"]
        lines.append(f"| {name} | {k['calls']} | {k['median_ms']:.2f} | {k['share']:.0%} | "
                     f"{w['median']:.0%} ({w['p10']:.0%}-{w['p90']:.0%}) |")
    return lines


def _format_threads(result: dict[str, Any]) -> list[str]:
    rows = _part_rows(result, "thread_time")
    if not rows:
        return []
    lines = ["", "Thread time (perf samples of the process during "
                 f"{next(iter(rows.values()))['calls']} more calls per part, no profiler): "
                 "shares of the main thread's time, which split the wall time, and of all "
                 "threads' time:", "",
             "| part | threads | samples | " + " | ".join(thread_time.THREAD_LABELS.values())
             + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in thread_time.THREAD_KEYS) + " |"]
    for name, t in rows.items():
        for who, label in (("main", "main"), ("all", f"all {t['threads']}")):
            cells = " | ".join(f"{t[who][k]:.1%}" for k in thread_time.THREAD_KEYS)
            lines.append(f"| {name} | {label} | {t[who + '_samples']} | {cells} |")
    return lines


def _parse_envs(text: str) -> list[int]:
    try:
        envs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        envs = []
    if not envs or min(envs) < 1:
        raise common.ConfigError(f"--envs must be a comma-separated list of positive "
                                 f"integers, e.g. 1,8; got {text!r}")
    return envs


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_process()
    p = argparse.ArgumentParser(description="Benchmark planning, updates and online training.")
    p.add_argument("--gin_file", action="append", default=[],
                   help=f"gin file (repeatable; default {DEFAULT_GIN})")
    p.add_argument("--gin_param", "--gin_bindings", dest="gin_param", action="append",
                   default=[], help="gin binding (repeatable)")
    p.add_argument("--out", default="bench.json", help="JSON output path")
    p.add_argument("--envs", default="1,8", help="env counts E for planning and env steps")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed calls of planning, updates and the matmul reference")
    p.add_argument("--sample_repeats", type=int, default=100,
                   help="timed replay samples and env steps")
    p.add_argument("--seed_steps", type=int, default=500,
                   help="agent steps of random actions that fill the replay first")
    p.add_argument("--pretrain_updates", type=int, default=10,
                   help="updates when seeding ends (not timed)")
    p.add_argument("--breakdown_repeats", type=int, default=3,
                   help="profiled calls per part for the time breakdown, CPU only (0 skips)")
    p.add_argument("--thread_repeats", type=int, default=3,
                   help="calls per part sampled with Linux perf for the thread-time table, "
                        "CPU only (0 skips)")
    p.add_argument("--e2e_steps", type=int, default=100,
                   help="agent steps of online training timed end to end (0 skips)")
    args = p.parse_args(argv)
    try:
        envs = _parse_envs(args.envs)
        for flag in ("breakdown_repeats", "thread_repeats"):
            if getattr(args, flag) < 0:
                raise common.ConfigError(
                    f"--{flag} must be >= 0 (0 skips), got {getattr(args, flag)}")
        for flag in ("repeats", "sample_repeats", "seed_steps"):
            if getattr(args, flag) < 1:
                raise common.ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        out = Path(args.out)
        if out.exists() and out.is_dir():
            raise common.ConfigError(f"--out {out} is a directory; give a file path")
        bench_params = [
            f"OnlineRunner.seed_steps = {args.seed_steps}",
            f"OnlineRunner.pretrain_updates = {args.pretrain_updates}",
            "OnlineRunner.eval_every = 0", "OnlineRunner.eval_episodes = 0",
            "OnlineRunner.checkpoint_every = 0", "OnlineRunner.progress = False",
        ]
        load_gin(args.gin_file or [DEFAULT_GIN], [*args.gin_param, *bench_params],
                        finalize=False)
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            try:
                result = run_bench(repeats=args.repeats, envs=envs,
                                   e2e_agent_steps=args.e2e_steps,
                                   sample_repeats=args.sample_repeats,
                                   run_dir=str(Path(tmp) / "run"),
                                   breakdown_repeats=args.breakdown_repeats,
                                   thread_repeats=args.thread_repeats)
            except (ValueError, TypeError) as e:
                raise common.ConfigError(f"could not build the benchmark: {e}") from None
    except (common.ConfigError, common.RunError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    result["args"] = vars(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(out)
    sys.stdout.write(format_table(result) + f"\n\nsaved {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
