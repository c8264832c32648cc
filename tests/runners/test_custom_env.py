"""A user's own gymnasium env trains through the unchanged runners (runners/examples/).

Both hand-over forms of gin/examples/: a registered id (`TASK = 'PointReach-v0'`) and a
gin-registered factory (`GymnasiumVecEnv.env = @point_reach_factory`), each trained by
`python -m runners.online` in a subprocess with gin/test/tiny.gin on top.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlcore.config import REPO_ROOT, load_gin

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO_ROOT / "gin" / "examples").glob("*.gin"))
TINY = ["--gin_file=gin/test/tiny.gin", "--gin_param=GymnasiumVecEnv.max_episode_steps = 50"]


def _python(*args, timeout=300):
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_example_env_follows_the_gymnasium_api():
    import gymnasium
    from gymnasium.utils.env_checker import check_env

    from runners.examples.point_reach import ENV_ID, point_reach_factory

    check_env(gymnasium.make(ENV_ID, render_mode="rgb_array").unwrapped, skip_render_check=False)
    env = point_reach_factory(goal_radius=3.0)  # the goal is always within reach
    env.reset(seed=0)
    _, reward, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
    assert terminated and not truncated and reward == 0.0
    assert gymnasium.spec(ENV_ID).max_episode_steps == 200


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_gin_files_build(path, tmp_path):
    load_gin([str(path), str(REPO_ROOT / "gin" / "test" / "tiny.gin")], finalize=False)
    from runners.pipelines import OnlineRunner

    runner = OnlineRunner(str(tmp_path / "run"))
    assert runner.spec.episodic and runner.spec.obs_shape == (4,)
    assert runner.spec.action_dim == 2 and runner.spec.episode_length == 200
    runner.env.close()
    runner.eval_env.close()


@pytest.mark.parametrize("gin_file, marker", [
    ("gin/examples/custom_env.gin", "GymnasiumVecEnv.env = %TASK"),
    pytest.param("gin/examples/custom_env_factory.gin",
                 "GymnasiumVecEnv.env = @point_reach_factory", marks=pytest.mark.slow),
], ids=["registered_id", "factory"])
def test_custom_env_trains_and_evaluates(tmp_path, gin_file, marker):
    run_dir = tmp_path / "run"
    proc = _python("runners.online", f"--gin_file={gin_file}", *TINY, f"--run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (run_dir / "config.gin").read_text()
    assert "import runners.examples.point_reach" in config and marker in config
    rows = (run_dir / "eval.csv").read_text().splitlines()
    assert rows[0].startswith("step,reward,seed") and rows[-1].startswith("1200,")
    assert np.isfinite(float(rows[-1].split(",")[1]))
    assert list((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    # The saved config alone rebuilds the env (the import line registers it again).
    proc = _python("runners.evaluate", f"--run_dir={run_dir}", "--episodes", "2",
                   "--videos", "1", "--video_size", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert len(result["planner"]["returns"]) == 2 and np.isfinite(result["planner"]["mean"])
    assert (run_dir / result["videos"][0]["path"]).stat().st_size > 0
