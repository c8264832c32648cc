"""A short pixel training run: `python -m runners.online` with gin/pixels_cpu.gin.

dm_control renders 64 x 64 frames (MUJOCO_GL=egl), the conv encoder trains on uint8
frame stacks from the replay, and the run leaves finite losses and an evaluation.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dm_control")

ROOT = Path(__file__).resolve().parents[2]
PARAMS = [
    "DMControlVecEnv.max_episode_steps = 100",  # env steps: 50-agent-step episodes
    "OnlineRunner.total_env_steps = 300",
    "OnlineRunner.seed_steps = 50",  # agent steps (and as many pretraining updates)
    "OnlineRunner.eval_every = 300",
    "OnlineRunner.checkpoint_every = 300",
    "OnlineRunner.log_every = 5",
]


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pixels") / "run"
    cmd = [sys.executable, "-m", "runners.online", "--gin_file=gin/pixels_cpu.gin",
           "--gin_file=gin/test/tiny.gin", *(f"--gin_param={p}" for p in PARAMS),
           f"--run_dir={run_dir}"]
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_pixel_run_trains_with_finite_losses(pixel_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(pixel_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("loss/loss_consistency", "loss/loss_reward", "loss/loss_value"):
        values = [e.value for e in acc.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    consistency = [e.value for e in acc.Scalars("loss/loss_consistency")]
    assert consistency[-1] < consistency[0]


def test_pixel_run_is_configured_for_pixels_and_evaluates(pixel_run):
    config = (pixel_run / "config.gin").read_text()
    assert "@encoders.ConvEncoder" in config and "'pixels'" in config
    lines = (pixel_run / "eval.csv").read_text().splitlines()
    assert lines[0].startswith("step,reward,seed")
    step, reward = lines[-1].split(",")[:2]
    assert int(step) == 300 and math.isfinite(float(reward))
