"""A learning run: TD-MPC2 on a cheap DMC task must clearly beat a random policy.

Task, budget and threshold were picked from a measurement (see the constants): the
random-policy return was measured with the same env layer and the same seeds, and the
threshold sits far above it. Marked `slow`; CI runs it (two seeds side by side, about 10
minutes of 2 cores).

The two training runs start when the session starts (`tests/conftest.py` calls
`start_runs` once collection selects this test) at the lowest CPU priority, so they use
the CPU the other tests leave idle (most tests wait on subprocesses or use one core); the
test, which runs near the end, collects them. Run alone, it starts them itself.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("envpool")

ROOT = Path(__file__).resolve().parents[1]
TASK = "cartpole-balance"
ENV_STEPS = 16_000  # env steps (action repeat 2, summed over 2 envs)
SEEDS = (1, 2)  # run side by side, one torch thread each
# Measured on 2 CPU cores, gin/quick_cpu.gin, one thread per run. The random policy scores
# 315 (4 episodes). The planner's evaluation return at 16k env steps, evaluating only
# there (evaluations draw from the training generator, so they change the run): 994
# (seed 1) and 700 (seed 2), mean 847, in 9:41 wall (2026-11-25, b1c03a4). A run of the
# code before it that evaluated every 2k steps had 669 and 898 at 16k (mean 784) and
# 612 and 794 at 20k: one seed swings by hundreds with float-level differences, the mean
# less. The threshold applies to the mean over the seeds and sits about halfway between
# random and the measured means. (Until 2026-11-25 the budget was 20k steps with
# evaluations at 10k and 20k, about 13 minutes, and the threshold 630.)
THRESHOLD = 560.0  # mean over SEEDS of the final evaluation return
EVAL_EVERY = ENV_STEPS  # one evaluation, at the end


def random_policy_return(task: str, episodes: int = 4, seed: int = 100_001) -> float:
    from rlcore.envs import EnvpoolVecEnv

    env = EnvpoolVecEnv(task, num_envs=episodes, seed=seed)
    env.reset()
    g = torch.Generator().manual_seed(0)
    returns = np.zeros(episodes)
    running = np.ones(episodes, dtype=bool)
    while running.any():
        td = env.step(torch.rand(episodes, env.spec.action_dim, generator=g) * 2 - 1)
        returns[running] += td["reward"].numpy()[running]
        running &= ~td["done"].numpy()
    env.close()
    return float(returns.mean())


# seed -> (training process, run dir, its stderr file); filled by start_runs.
_RUNS: dict[int, tuple[subprocess.Popen, Path, Path]] = {}


def _launch(seed: int, run_dir: Path, stderr: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runners.online", "--gin_file=gin/quick_cpu.gin",
           f"--run_dir={run_dir}", f"--gin_param=TASK = '{TASK}'",
           f"--gin_param=OnlineRunner.total_env_steps = {ENV_STEPS}",
           f"--gin_param=OnlineRunner.seed = {seed}",
           "--gin_param=OnlineRunner.num_threads = 1",
           f"--gin_param=OnlineRunner.eval_every = {EVAL_EVERY}",
           "--gin_param=OnlineRunner.progress = False"]
    with open(stderr, "w") as err:  # a file, not a pipe: nobody reads it until the end
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MUJOCO_GL": "egl"},
                                stdout=subprocess.DEVNULL, stderr=err)


def start_runs(base: Path, *, niceness: int = 0) -> None:
    """Start the training run of every seed under `base` (once per process), each at
    `niceness` (19: only CPU time nothing else wants). Their results do not depend on it."""
    if _RUNS:
        return
    base.mkdir(parents=True, exist_ok=True)
    for seed in SEEDS:
        run_dir, stderr = base / f"seed{seed}", base / f"seed{seed}.stderr"
        proc = _launch(seed, run_dir, stderr)
        if niceness:
            os.setpriority(os.PRIO_PROCESS, proc.pid, niceness)
        _RUNS[seed] = (proc, run_dir, stderr)


def stop_runs() -> None:
    """Kill runs still going (the session ended before the test collected them)."""
    for proc, _, _ in _RUNS.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_tdmpc2_beats_random_on_cartpole_balance(tmp_path):
    start_runs(tmp_path)  # no-op when the session already started them
    random_return = random_policy_return(TASK)
    assert random_return < THRESHOLD / 1.5
    curves = {}
    for seed, (proc, run_dir, stderr) in _RUNS.items():
        proc.wait(timeout=3600)
        assert proc.returncode == 0, stderr.read_text()[-3000:]
        with open(run_dir / "eval.csv") as f:
            rows = list(csv.DictReader(f))
        assert int(rows[-1]["step"]) == ENV_STEPS
        curves[seed] = [(int(r["step"]), round(float(r["reward"]), 1)) for r in rows]
    mean_final = float(np.mean([curve[-1][1] for curve in curves.values()]))
    assert mean_final > THRESHOLD, (
        f"mean eval return {mean_final:.1f} over seeds {SEEDS} after {ENV_STEPS} env steps "
        f"(random policy: {random_return:.1f}); curves: {curves}")
