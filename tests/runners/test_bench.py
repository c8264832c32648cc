"""`python -m runners.bench`: the figures it prints are measured and counted, not assumed.

Nothing here asserts a speed (timed assertions flake on shared machines); the tests check
that the FLOP counts are real counts, that the rates agree with each other, that the
warm-up is kept apart, that the report renders saved runs, and that bad input fails
cleanly.
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






def test_summarize_reports_median_and_spread():
    s = bench.summarize([0.001 * i for i in range(1, 12)])  # 1..11 ms
    assert s["median_ms"] == pytest.approx(6.0)
    assert s["p10_ms"] == pytest.approx(2.0) and s["p90_ms"] == pytest.approx(10.0)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(11.0)
    assert s["n"] == 11


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
    parts = result["parts"]
    for part in ("plan_E1", "plan_E4", "update", "replay_sample", "env_step_E1", "env_step_E4"):
        assert parts[part]["median_ms"] > 0, part
        assert parts[part]["p10_ms"] <= parts[part]["median_ms"] <= parts[part]["p90_ms"]
        assert f"| {part} |" in stdout
    assert result["matmul"]["gflops_per_s"] > 0
    assert "fp32 matmul reference" in stdout and "end-to-end:" in stdout
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert machine["cpu"] and machine["torch_threads"] >= 1 and machine["commit"]
    config = result["config"]
    assert config["task"] == "cartpole-balance" and config["num_envs"] == 2
    assert config["gin_files"] == ["gin/tdmpc2_dog.gin", "gin/test/tiny.gin"]
    assert config["gin_params"] == ["TASK = 'cartpole-balance'"]
    assert "MPPIPlanner.num_samples = 32" in config["operative_config"]
    mem = result["memory"]
    # tiny cartpole: 5 obs + 1 action + reward (float32), terminated (bool), episode (int64)
    assert mem["replay_bytes_per_step"] == 4 * 5 + 4 * 1 + 4 + 1 + 8
    assert mem["peak_rss_bytes"] > 0


def test_planning_flops_are_counted_and_scale_with_envs(tiny_bench):
    result, _ = tiny_bench
    parts = result["parts"]
    f1, f4 = parts["plan_E1"]["flops"], parts["plan_E4"]["flops"]
    assert f1 > 0 and f4 == 4 * f1  # every planning matmul is batched over the E envs
    assert parts["update"]["flops"] > 0
    for part in ("plan_E1", "update"):
        r = parts[part]
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
    paired_fractions = bench.paired_fractions
    mm = [1.0, 2.0, 4.0, 4.0, 4.0]  # matmul call times, the machine slowing down
    part = [0.5, 1.0, 2.0, 2.0, 2.0]  # a part that always takes half the matmul's time
    pair = paired_fractions(part, mm, flops=100, mm_flops=100)
    assert pair == {"median": 2.0, "p10": 2.0, "p90": 2.0, "n": 5}
    drifted = paired_fractions([0.5, 1.0, 2.0], [1.0, 1.0, 1.0], flops=100, mm_flops=100)
    assert drifted["median"] == 1.0 and drifted["p10"] < 1.0 < drifted["p90"]


def test_step_rates_agree_with_each_other():
    r = bench.step_rates(100.0, action_repeat=2)
    assert r["env_steps_per_second"] == 200.0
    assert r["hours_per_million_agent_steps"] == pytest.approx(1e6 / 100.0 / 3600)


def test_end_to_end_reports_agent_and_env_steps_and_hours(tiny_bench):
    result, stdout = tiny_bench
    e2e = result["end_to_end"]
    assert e2e["agent_steps"] == 20 and e2e["env_steps"] == 20 * 2  # action repeat 2
    assert e2e["updates"] > 0
    assert e2e["agent_steps_per_second"] == pytest.approx(e2e["agent_steps"] / e2e["seconds"])
    assert e2e["env_steps_per_second"] == pytest.approx(2 * e2e["agent_steps_per_second"])
    assert e2e["hours_per_million_agent_steps"] == pytest.approx(
        1e6 / e2e["agent_steps_per_second"] / 3600)
    assert sum(e2e["share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert e2e["share"]["plan"] > 0 and e2e["share"]["update"] > 0 and e2e["share"]["env"] > 0
    assert (f"{e2e['agent_steps_per_second']:.1f} agent steps/s, "
            f"{e2e['env_steps_per_second']:.1f} env steps/s, "
            f"{e2e['hours_per_million_agent_steps']:.1f} h per 1M agent steps") in stdout


def test_rates_per_env_count_come_from_the_parts(tiny_bench):
    """Per E: a loop of E agent steps is one planning call, one env step and
    E x utd_ratio (tiny.gin: 0.25) replay samples and updates."""
    result, _ = tiny_bench
    parts = result["parts"]
    assert [r["envs"] for r in result["per_envs"]] == [1, 4]
    for r in result["per_envs"]:
        E = r["envs"]
        loop_ms = (parts[f"plan_E{E}"]["median_ms"] + parts[f"env_step_E{E}"]["median_ms"]
                   + E * 0.25 * (parts["update"]["median_ms"]
                                 + parts["replay_sample"]["median_ms"]))
        assert r["agent_steps_per_second"] == pytest.approx(E / loop_ms * 1e3)
        assert r["env_steps_per_second"] == pytest.approx(2 * r["agent_steps_per_second"])
        assert r["hours_per_million_agent_steps"] == pytest.approx(
            1e6 / r["agent_steps_per_second"] / 3600)


def test_warmup_is_reported_apart(tiny_bench):
    result, stdout = tiny_bench
    w = result["warmup"]
    assert w["plan_envs"] == 2 and w["plan_s"] > 0 and w["update_s"] > 0
    assert (f"first planning call (E=2) {w['plan_s']:.2f} s, first update "
            f"{w['update_s']:.2f} s") in stdout


def test_first_update_times_itself_once_wherever_it_runs():
    class Agent:
        def update(self, batch, pathway="full"):
            return batch, pathway

    agent, warmup = Agent(), {}
    bench._time_first_update(agent, torch.device("cpu"), warmup)
    kept = agent.update  # what a timing loop holds when no update ran before it
    assert agent.update(1, pathway="policy") == (1, "policy")
    assert kept(3) == (3, "full")  # plain, and timed once only
    first = warmup["update_s"]
    assert first > 0 and "update" not in vars(agent)  # the plain method again
    assert agent.update(2) == (2, "full") and warmup["update_s"] == first


def test_report_renders_saved_runs_with_machine_commit_and_config(tiny_bench, tmp_path,
                                                                  capsys):
    result, stdout = tiny_bench
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result))
    tables = tmp_path / "docs" / "tables.md"
    assert bench.main(["--report", str(saved), str(saved), f"--report_out={tables}"]) == 0
    printed = capsys.readouterr().out
    assert printed == tables.read_text()
    m = result["machine"]
    for text in (m["cpu"], f"commit {m['commit']}", f"torch {m['torch']}", m["date"],
                 "### cartpole-balance", "MPPIPlanner (2 iterations x 32 samples",
                 "gin/tdmpc2_dog.gin, gin/test/tiny.gin; `TASK = 'cartpole-balance'`",
                 "| plan_E4 |", "- end-to-end:"):
        assert printed.count(text) == 2, text  # once per file
    assert bench.format_table(result) in stdout  # the run printed the same table


@pytest.mark.parametrize("args, message", [
    (["--envs=0"], "--envs"),
    (["--repeats=0"], "--repeats"),
    (["--e2e_steps=-1"], "--e2e_steps"),
    (["--report=no/such.json"], "no/such.json"),
    (["--report_out=tables.md"], "--report_out goes with --report"),
    # 2 envs of 50-agent-step episodes: 50 seed steps end none, the replay cannot sample
    (["--seed_steps=50"], "use --seed_steps=100"),
])
def test_bad_flags_fail_with_one_clear_error(tmp_path, capsys, args, message):
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, f"--out={out}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not out.exists()


def test_bad_config_fails_with_one_clear_error(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench(*TINY, f"--out={out}", "--gin_param=OnlineRunner.no_such_thing = 1",
                  timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "no_such_thing" in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernel_fraction_of_a_busy_gpu():
    x = torch.randn(4096, 4096, device="cuda")
    busy = bench.gpu_kernel_fraction(lambda: x @ x, torch.device("cuda"))
    assert 0.3 < busy <= 1.05  # back-to-back products keep the GPU busy
