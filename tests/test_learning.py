"""A learning run: TD-MPC2 on a cheap DMC task must clearly beat a random policy.

Task, budget and threshold were picked from a measurement (see the constants): the
random-policy return was measured with the same env layer and the same seeds, and the
threshold sits far above it. Marked `slow`; CI runs it (two seeds side by side, about 8
minutes on 2 cores).
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
ENV_STEPS = 20_000  # env steps (action repeat 2, summed over 2 envs)
SEEDS = (1, 2)  # run side by side, one torch thread each
# Measured on 2 CPU cores (2026-11-24), gin/quick_cpu.gin, one thread per run: the random
# policy scores 315 (4 episodes); the planner's evaluation return at 20k env steps was
# 996 (seed 1) and 895 (seed 2), and 826 for seed 2 with the code before the
# speed work (one seed alone swings a lot: seed 1 with two threads gave 990 before the
# speed work and 609 after, from float-level differences). The threshold applies to the
# mean over the seeds and sits about halfway between random and the measured mean.
THRESHOLD = 630.0  # mean over SEEDS of the final evaluation return


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


def _launch(seed: int, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runners.online", "--gin_file=gin/quick_cpu.gin",
           f"--run_dir={run_dir}", f"--gin_param=TASK = '{TASK}'",
           f"--gin_param=OnlineRunner.total_env_steps = {ENV_STEPS}",
           f"--gin_param=OnlineRunner.seed = {seed}",
           "--gin_param=OnlineRunner.num_threads = 1",
           "--gin_param=OnlineRunner.eval_every = 10_000",
           "--gin_param=OnlineRunner.progress = False"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MUJOCO_GL": "egl"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_tdmpc2_beats_random_on_cartpole_balance(tmp_path):
    random_return = random_policy_return(TASK)
    assert random_return < THRESHOLD / 1.5
    run_dirs = {seed: tmp_path / f"seed{seed}" for seed in SEEDS}
    procs = {seed: _launch(seed, run_dir) for seed, run_dir in run_dirs.items()}
    curves = {}
    for seed, proc in procs.items():
        _, stderr = proc.communicate(timeout=1500)
        assert proc.returncode == 0, stderr[-3000:]
        with open(run_dirs[seed] / "eval.csv") as f:
            rows = list(csv.DictReader(f))
        assert int(rows[-1]["step"]) == ENV_STEPS
        curves[seed] = [(int(r["step"]), round(float(r["reward"]), 1)) for r in rows]
    mean_final = float(np.mean([curve[-1][1] for curve in curves.values()]))
    assert mean_final > THRESHOLD, (
        f"mean eval return {mean_final:.1f} over seeds {SEEDS} after {ENV_STEPS} env steps "
        f"(random policy: {random_return:.1f}); curves: {curves}")
