"""Speed benchmark: `python -m runners.bench [--gin_file=gin/tdmpc2_dog.gin] [--out=bench.json]`.

For a gin config (default: dog-run, 5M model, paper planner settings) it measures:

- one planning call per E in `--envs` (observation in, action out), one update, one replay
  sample and one env step: median and p10-p90 wall time;
- the FLOPs of a planning call and an update (`torch.utils.flop_counter`: matrix products,
  forward and backward), their GFLOP/s, and its fraction of a plain fp32 matmul timed
  alternately with them (the ratio of the medians, and the median of call-by-call ratios);
- end-to-end online training past seeding and pretraining: agent steps/s, env steps/s,
  hours per 1M agent steps and the share of wall time per part; per E, the same rates
  estimated from the parts;
- the warm-up apart: the first planning call and the first update (torch.compile's
  compilation, when it is on, happens there);
- peak memory, the machine, the commit and the config.

The table (markdown) goes to stdout, everything to the JSON file. `--report a.json b.json
[--report_out FILE]` renders saved JSON files as the tables of docs/benchmarks.md. The
end-to-end phase trains for real in a temporary run directory deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
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

from rlcore.config import load_gin
from runners import common

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


def gpu_kernel_fraction(fn: Callable[[], Any], device: torch.device, calls: int = 5) -> float:
    """GPU kernel time over wall time of `calls` calls of `fn`, from torch's profiler (a
    CUDA device only): how busy the GPU is while the call runs."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        wall = time.perf_counter() - t0
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return kernel_us / 1e6 / wall


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


def with_rate(timing: dict[str, float], flops: int, matmul_gflops: float,
              paired: dict[str, float]) -> dict[str, Any]:
    """A part's timing with its FLOPs, achieved GFLOP/s and fraction of the matmul's
    (the ratio of the medians, and the call-by-call `paired_fractions`)."""
    gflops = flops / (timing["median_ms"] / 1e3) / 1e9
    return {**timing, "flops": flops, "gflops_per_s": gflops,
            "matmul_gflops_per_s": matmul_gflops, "matmul_fraction": gflops / matmul_gflops,
            "matmul_fraction_paired": paired}


def step_rates(agent_steps_per_second: float, action_repeat: int) -> dict[str, float]:
    """Agent steps/s (summed over envs), env steps/s (action repeat included) and hours
    per 1M agent steps, the unit TD-MPC2 results are quoted in."""
    return {"agent_steps_per_second": agent_steps_per_second,
            "env_steps_per_second": agent_steps_per_second * action_repeat,
            "hours_per_million_agent_steps": 1e6 / agent_steps_per_second / 3600}


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
            "device": str(device), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["commit"] = subprocess.run(
            # "-dirty" when the working tree has uncommitted changes
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


# -- the benchmark ----------------------------------------------------------------------
def _random_obs(spec, E: int) -> torch.Tensor:
    if spec.obs_type == "pixels":
        return torch.randint(0, 256, (E, *spec.obs_shape), dtype=torch.uint8)
    return torch.randn(E, *spec.obs_shape)


def _time_first_update(agent, device: torch.device, into: dict[str, float]) -> None:
    """Have the agent's first `update` call (wherever it happens: pretraining, or the
    update part's warm-up) time itself into `into["update_s"]`; later calls are plain."""
    update = agent.update

    def first_update(*args, **kwargs):
        if "update_s" in into:  # a caller kept this function: plain from now on
            return update(*args, **kwargs)
        del agent.update  # the class's method again
        t0 = time.perf_counter()
        out = update(*args, **kwargs)
        _sync(device)
        into["update_s"] = time.perf_counter() - t0
        return out

    agent.update = first_update


def _end_to_end(runner, agent_steps: int) -> dict[str, Any] | None:
    """Seed, pretrain, then `agent_steps` agent steps of online training; the rates of
    the part after pretraining."""
    runner.total_env_steps = (runner.seed_steps + agent_steps) * runner.spec.action_repeat
    runner.run()
    out = runner.throughput()
    if out is not None:
        out["agent_steps"] = out["env_steps"] // runner.spec.action_repeat
        out.update(step_rates(out["agent_steps"] / out["seconds"], runner.spec.action_repeat))
    return out


def _config(runner) -> dict[str, Any]:
    agent, spec, planner = runner.agent, runner.spec, runner.agent.planner
    return {
        "task": getattr(spec, "task", None) or getattr(runner.env, "task", None),
        "obs_shape": list(spec.obs_shape), "action_dim": spec.action_dim,
        "action_repeat": spec.action_repeat, "num_envs": spec.num_envs,
        "model_parameters": sum(p.numel() for p in agent.model.parameters()
                                if p.requires_grad),
        "planner": type(planner).__name__, "planner_iterations": planner.iterations,
        "num_samples": planner.num_samples, "horizon": planner.horizon,
        "batch_size": runner.replay.batch_size,
        "aux_discounts": agent.model.aux_discounts.tolist(),
        "updates_per_agent_step": runner.schedule,
        "seed_steps": runner.seed_steps, "pretrain_updates": runner.pretrain_updates,
        "operative_config": runner.operative_config,
    }


def run_bench(*, repeats: int, envs: Sequence[int], e2e_agent_steps: int,
              sample_repeats: int, run_dir: str) -> dict[str, Any]:
    from runners.pipelines import OnlineRunner

    runner = OnlineRunner(run_dir)
    agent, replay, spec, device = runner.agent, runner.replay, runner.spec, runner.device
    # The replay samples whole episodes only: seeding must finish one in every env.
    whole = spec.episode_length * spec.num_envs
    if runner.seed_steps < whole:
        raise common.ConfigError(
            f"--seed_steps {runner.seed_steps} ends no episode: {spec.num_envs} env(s) of "
            f"{spec.episode_length} agent steps need at least {whole} seed steps before the "
            f"replay can sample; use --seed_steps={whole}")
    result: dict[str, Any] = {"machine": machine_info(device), "config": _config(runner)}

    # The warm-up, timed apart: the first planning call now, the first update wherever
    # it comes (pretraining, or the update part below when there is no end-to-end run).
    warmup: dict[str, Any] = {"plan_envs": spec.num_envs}
    _time_first_update(agent, device, warmup)
    t0 = time.perf_counter()
    agent.act(_random_obs(spec, spec.num_envs), torch.ones(spec.num_envs, dtype=torch.bool))
    _sync(device)
    warmup["plan_s"] = time.perf_counter() - t0

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

    matmul = Matmul(device)
    all_mm: list[float] = []
    parts: dict[str, dict[str, Any]] = {}

    def measure(fn: Callable[[], Any]) -> dict[str, Any]:
        times, mm_times = time_interleaved(fn, matmul, repeats, device, warmup=2)
        all_mm.extend(mm_times)
        flops = count_flops(fn)
        out = with_rate(summarize(times), flops, matmul.rate(mm_times)["gflops_per_s"],
                        paired_fractions(times, mm_times, flops, matmul.flops))
        if device.type == "cuda":
            out["gpu_kernel_fraction"] = gpu_kernel_fraction(fn, device)
        return out

    for E in envs:
        _log.info("bench: planning, E=%d", E)
        obs = _random_obs(spec, E)
        agent.act(obs, torch.ones(E, dtype=torch.bool))  # warm start in place
        parts[f"plan_E{E}"] = measure(
            functools.partial(agent.act, obs, torch.zeros(E, dtype=torch.bool)))
    _log.info("bench: update, replay sample, env steps")
    parts["update"] = measure(functools.partial(agent.update, replay.sample()))
    parts["replay_sample"] = summarize(time_calls(replay.sample, sample_repeats, device))
    for E in envs:
        env = runner.env_factory(num_envs=E, seed=runner.seed + 7)
        env.reset()
        action = torch.rand(E, spec.action_dim) * 2 - 1
        step = summarize(time_calls(functools.partial(env.step, action), sample_repeats,
                                    device))
        env.close()
        parts[f"env_step_E{E}"] = {
            **step, "env_steps_per_second": E * spec.action_repeat / (step["median_ms"] / 1e3)}
    result["parts"] = parts
    result["matmul"] = matmul.rate(all_mm)
    result["warmup"] = warmup
    result["per_envs"] = _per_envs(parts, envs, sum(runner.schedule.values()),
                                   spec.action_repeat)
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


def _per_envs(parts: dict[str, dict[str, Any]], envs: Sequence[int], updates_per_step: float,
              action_repeat: int) -> list[dict[str, Any]]:
    """Training rates per E estimated from the parts: one loop of E agent steps takes a
    planning call, an env step and E x `updates_per_step` (replay sample + update)."""
    update_ms = parts["update"]["median_ms"] + parts["replay_sample"]["median_ms"]
    out = []
    for E in envs:
        loop_ms = (parts[f"plan_E{E}"]["median_ms"] + parts[f"env_step_E{E}"]["median_ms"]
                   + E * updates_per_step * update_ms)
        out.append({"envs": E, **step_rates(E / (loop_ms / 1e3), action_repeat)})
    return out


# -- output -----------------------------------------------------------------------------
def _rates_text(r: dict[str, float]) -> str:
    return (f"{r['agent_steps_per_second']:.1f} agent steps/s, "
            f"{r['env_steps_per_second']:.1f} env steps/s, "
            f"{r['hours_per_million_agent_steps']:.1f} h per 1M agent steps")


def format_table(result: dict[str, Any]) -> str:
    """One bench result as markdown: a header naming the run, the parts table, the
    end-to-end rates, the warm-up and memory."""
    m, cfg, mm = result["machine"], result["config"], result["matmul"]
    gin_text = ", ".join(cfg.get("gin_files", [])) + "".join(
        f"; `{p}`" for p in cfg.get("gin_params", []))
    lines = [
        f"### {cfg['task']}: {cfg['model_parameters'] / 1e6:.2f}M parameters, "
        f"{cfg['planner']} ({cfg['planner_iterations']} iterations x {cfg['num_samples']} "
        f"samples, horizon {cfg['horizon']}), batch {cfg['batch_size']}, "
        f"{cfg['num_envs']} env(s)",
        "",
        f"- machine: {m.get('gpu') or m['cpu']} | {m['device']} | torch {m['torch']} | "
        f"{m['torch_threads']} threads | commit {m.get('commit')} | {m['date']}",
        f"- config: {gin_text or 'n/a'}",
        f"- fp32 matmul reference ({mm['size']}^3, timed alternately with each part): "
        f"{mm['gflops_per_s']:.1f} GFLOP/s median",
        "",
        "| part | median ms | p10-p90 ms | n | GFLOP/call | GFLOP/s | of matmul "
        "| paired (p10-p90) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["parts"].items():
        rate = "| | |"
        if "flops" in r:
            pair = r["matmul_fraction_paired"]
            rate = (f"{r['flops'] / 1e9:.3f} | {r['gflops_per_s']:.1f} | "
                    f"{r['matmul_fraction']:.0%} | "
                    f"{pair['median']:.0%} ({pair['p10']:.0%}-{pair['p90']:.0%})")
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} "
                     f"| {r['n']} | {rate} |")
    busy = [f"{name} {r['gpu_kernel_fraction']:.0%}" for name, r in result["parts"].items()
            if "gpu_kernel_fraction" in r]
    if busy:
        lines += ["", "- GPU kernel time / wall time (torch profiler): " + ", ".join(busy)]
    lines.append("")
    e2e = result.get("end_to_end")
    if e2e:
        share = ", ".join(f"{k} {v:.0%}" for k, v in e2e["share"].items() if v >= 0.005)
        lines.append(f"- end-to-end: {_rates_text(e2e)} over {e2e['agent_steps']} agent "
                     f"steps ({e2e['updates']} updates, {e2e['seconds']:.1f} s); time: {share}")
    else:
        lines.append("- end-to-end: not measured")
    lines.append("- estimated from the parts (planning + env step + updates): " + "; ".join(
        f"E={r['envs']}: {_rates_text(r)}" for r in result["per_envs"]))
    w = result["warmup"]
    update = f"{w['update_s']:.2f} s" if "update_s" in w else "not run"
    lines.append(f"- warm-up (torch.compile included when on; in no figure above): first "
                 f"planning call (E={w['plan_envs']}) {w['plan_s']:.2f} s, first update "
                 f"{update}")
    mem = result["memory"]
    mem_line = (f"- memory: peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB; replay "
                f"{mem['replay_bytes_per_step']} B per stored step "
                f"({mem['replay_allocated_bytes'] / 2**30:.2f} GiB for "
                f"{mem['replay_capacity_rows']:,} rows)")
    if "cuda_peak_allocated_bytes" in mem:
        mem_line += f"; CUDA peak {mem['cuda_peak_allocated_bytes'] / 2**30:.2f} GiB allocated"
    lines.append(mem_line)
    return "\n".join(lines)


def report(paths: Sequence[str]) -> str:
    """The markdown tables of saved bench JSON files, one section each."""
    sections = []
    for path in paths:
        try:
            sections.append(format_table(json.loads(Path(path).read_text())))
        except OSError as e:
            raise common.ConfigError(f"--report: cannot read {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise common.ConfigError(f"--report: {path} is not a runners.bench JSON file "
                                     f"({type(e).__name__}: {e})") from None
    return "\n\n".join(sections) + "\n"


def _parse_envs(text: str) -> list[int]:
    try:
        envs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        envs = []
    if not envs or min(envs) < 1:
        raise common.ConfigError(f"--envs must be a comma-separated list of positive "
                                 f"integers, e.g. 1,8; got {text!r}")
    return list(dict.fromkeys(envs))


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    """Check the flags, load the config and run the benchmark (ConfigError on bad input)."""
    envs = _parse_envs(args.envs)
    for flag in ("repeats", "sample_repeats", "seed_steps"):
        if getattr(args, flag) < 1:
            raise common.ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("pretrain_updates", "e2e_steps"):
        if getattr(args, flag) < 0:
            raise common.ConfigError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if Path(args.out).is_dir():
        raise common.ConfigError(f"--out {args.out} is a directory; give a file path")
    gin_files = args.gin_file or [DEFAULT_GIN]
    bench_params = [
        f"OnlineRunner.seed_steps = {args.seed_steps}",
        f"OnlineRunner.pretrain_updates = {args.pretrain_updates}",
        "OnlineRunner.eval_every = 0", "OnlineRunner.eval_episodes = 0",
        "OnlineRunner.checkpoint_every = 0", "OnlineRunner.progress = False",
    ]
    load_gin(gin_files, [*args.gin_param, *bench_params], finalize=False)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        try:
            result = run_bench(repeats=args.repeats, envs=envs, e2e_agent_steps=args.e2e_steps,
                               sample_repeats=args.sample_repeats,
                               run_dir=str(Path(tmp) / "run"))
        except (ValueError, TypeError) as e:
            raise common.ConfigError(f"could not build the benchmark: {e}") from None
    result["config"].update(gin_files=gin_files, gin_params=args.gin_param)
    result["args"] = vars(args)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_process()
    p = argparse.ArgumentParser(description="Benchmark planning, updates and online training.")
    p.add_argument("--gin_file", action="append", default=[],
                   help=f"gin file (repeatable; default {DEFAULT_GIN})")
    p.add_argument("--gin_param", "--gin_bindings", dest="gin_param", action="append",
                   default=[], help="gin binding (repeatable)")
    p.add_argument("--out", default="bench.json", help="JSON output path")
    p.add_argument("--envs", default="1,8",
                   help="env counts E for planning and env steps, e.g. 1,4,8,16")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed calls of planning and updates (each paired with a matmul)")
    p.add_argument("--sample_repeats", type=int, default=100,
                   help="timed replay samples and env steps")
    p.add_argument("--seed_steps", type=int, default=500,
                   help="agent steps of random actions that fill the replay first")
    p.add_argument("--pretrain_updates", type=int, default=10,
                   help="updates when seeding ends (not timed)")
    p.add_argument("--e2e_steps", type=int, default=100,
                   help="agent steps of online training timed end to end (0 skips)")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="print the markdown tables of saved bench JSON files; runs nothing")
    p.add_argument("--report_out", help="with --report: also write the tables to this file")
    args = p.parse_args(argv)
    try:
        if args.report_out and not args.report:
            raise common.ConfigError("--report_out goes with --report")
        if args.report:
            text = report(args.report)
            if args.report_out:
                Path(args.report_out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.report_out).write_text(text)
            sys.stdout.write(text)
            return 0
        result = _bench(args)
    except (common.ConfigError, common.RunError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(out)
    sys.stdout.write(format_table(result) + f"\n\nsaved {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
