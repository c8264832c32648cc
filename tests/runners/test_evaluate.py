"""`python -m runners.evaluate` end to end, in subprocesses (CleanRL / Dopamine style).

A tiny online run on the PointReach example env (gymnasium, renders in numpy) is trained
once; the evaluator then rebuilds it from its config.gin alone. The envpool -> dm_control
video path has its own test, skipped while rlcore.dmc is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--gin_file=gin/examples/custom_env.gin", "--gin_file=gin/test/tiny.gin",
        "--gin_param=GymnasiumVecEnv.max_episode_steps = 50"]


def _python(*args, timeout=300):
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    proc = _python("runners.online", *TINY, f"--run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def evaluated(trained_run):
    before = _snapshot(trained_run)
    proc = _python("runners.evaluate", f"--run_dir={trained_run}", "--episodes", "2",
                   "--videos", "1", "--video_size", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return trained_run, proc, before


def test_eval_json_has_returns_per_episode(evaluated):
    run_dir, proc, _ = evaluated
    result = json.loads((run_dir / "eval.json").read_text())
    assert json.loads(proc.stdout) == result  # printed and written alike
    assert {"step", "planner", "policy_prior", "videos"} <= set(result)
    assert result["step"] == 1200  # the newest checkpoint (tiny.gin: 1200 env steps)
    for mode in ("planner", "policy_prior"):
        returns = result[mode]["returns"]
        assert len(returns) == 2 and all(np.isfinite(returns))
        assert result[mode]["mean"] == pytest.approx(np.mean(returns))
        assert result[mode]["std"] == pytest.approx(np.std(returns))
        assert all(1 <= n <= 50 for n in result[mode]["lengths"])


def test_video_is_written_and_readable(evaluated):
    from rlcore.video import read_mp4

    run_dir, _, _ = evaluated
    (video,) = json.loads((run_dir / "eval.json").read_text())["videos"]
    path = run_dir / video["path"]
    assert path == run_dir / "videos" / "eval_step1200_ep0.mp4"
    frames = read_mp4(path)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3)
    assert len(frames) == video["frames"] == video["length"] > 0
    assert frames.std() > 0  # not a blank clip
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]


def test_video_reaches_tensorboard_as_a_gif(evaluated):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = evaluated
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("eval_video/ep0")
    assert image.step == 1200
    gif = Image.open(io.BytesIO(image.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames > 1


def test_evaluation_overwrites_nothing(evaluated):
    run_dir, _, before = evaluated
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before
    new = set(after) - set(before)
    assert {"eval.json", "videos/eval_step1200_ep0.mp4"} <= new
    assert all(p in ("eval.json", "videos/eval_step1200_ep0.mp4")
               or p.startswith("tb/events.out.tfevents.") for p in new), new


def test_flags_skip_policy_prior_and_videos(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    proc = _python("runners.evaluate", f"--run_dir={run_dir}", "--episodes", "3",
                   "--videos", "0", "--no_policy_prior",
                   "--checkpoint", str(sorted((run_dir / "checkpoints").glob("step_*"))[0]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 600 and len(result["planner"]["returns"]) == 3
    assert result["policy_prior"] is None and result["videos"] == []
    assert not list(run_dir.glob("videos/eval_step600_*"))


@pytest.mark.parametrize("remove", ["checkpoints", "sentinels"])
def test_run_without_checkpoint_is_one_clear_error(trained_run, tmp_path, remove):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    if remove == "checkpoints":
        shutil.rmtree(run_dir / "checkpoints")
    else:  # interrupted saves: folders without their COMPLETE sentinel
        for sentinel in (run_dir / "checkpoints").glob("step_*/COMPLETE"):
            sentinel.unlink()
    (run_dir / "eval.json").unlink(missing_ok=True)
    before = _snapshot(run_dir)
    proc = _python("runners.evaluate", f"--run_dir={run_dir}")
    assert proc.returncode == 2
    assert "no complete checkpoint" in proc.stderr and "nothing to evaluate" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _snapshot(run_dir) == before


def test_run_without_config_is_one_clear_error(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints")
    proc = _python("runners.evaluate", f"--run_dir={run_dir}")
    assert proc.returncode == 2
    assert "no config.gin" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "eval.json").exists()


def test_config_gin_alone_rebuilds_the_agent(trained_run):
    """The agent built from config.gin has the checkpoint's architecture and weights."""
    from rlcore.config import load_gin
    from runners.evaluation import Evaluator

    load_gin([str(trained_run / "config.gin")], finalize=False)
    evaluator = Evaluator(str(trained_run), episodes=1, videos=0, device="cpu")
    evaluator.env.close()
    ckpt = sorted((trained_run / "checkpoints").glob("step_*"))[-1]
    saved = torch.load(ckpt / "state.pt", weights_only=True)["agent"]["model"]
    rebuilt = evaluator.agent.model.state_dict()
    assert list(rebuilt) == list(saved)
    for name, value in saved.items():
        assert rebuilt[name].shape == value.shape, name
        assert torch.equal(rebuilt[name], value), name
    assert evaluator.step == 1200 and evaluator.spec.task == "PointReach-v0"


def test_gymnasium_env_renders_frames():
    import runners.examples.point_reach  # noqa: F401 - registers PointReach-v0
    from rlcore.envs import GymnasiumVecEnv

    env = GymnasiumVecEnv("PointReach-v0", num_envs=2, seed=0, render_mode="rgb_array")
    env.reset()
    frames = env.render(48)
    assert frames.shape == (2, 48, 48, 3) and frames.dtype == np.uint8
    env.close()
    plain = GymnasiumVecEnv("PointReach-v0", num_envs=1)
    plain.reset()
    with pytest.raises(RuntimeError, match="render_mode='rgb_array'"):
        plain.render()


def test_mp4_round_trip_is_atomic(tmp_path):
    from rlcore.video import read_mp4, write_mp4

    frames = np.zeros((6, 32, 48, 3), np.uint8)
    frames[:, :, :16] = 255
    assert write_mp4(frames, tmp_path / "a.mp4", fps=10) == 6
    back = read_mp4(tmp_path / "a.mp4")
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).mean() < 8
    (tmp_path / "b.mp4").write_bytes(b"keep")
    with pytest.raises(ValueError, match="even"):
        write_mp4(np.zeros((2, 33, 33, 3), np.uint8), tmp_path / "b.mp4")
    assert (tmp_path / "b.mp4").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]


@pytest.mark.slow  # long: run by .ci/run's second pass (-m 'slow or slurm or ray')
def test_envpool_run_records_videos_with_dm_control(tmp_path):
    """envpool cannot render: videos of an envpool run come from rlcore.dmc on the same task."""
    pytest.importorskip("envpool")
    pytest.importorskip("rlcore.dmc")
    run_dir = tmp_path / "run"
    proc = _python("runners.online", "--gin_file=gin/tdmpc2_dog.gin",
                   "--gin_file=gin/test/tiny.gin", "--gin_param=TASK = 'cartpole-balance'",
                   f"--run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _python("runners.evaluate", f"--run_dir={run_dir}", "--episodes", "1",
                   "--videos", "1", "--video_size", "64", "--no_policy_prior")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (video,) = json.loads((run_dir / "eval.json").read_text())["videos"]
    from rlcore.video import read_mp4

    frames = read_mp4(run_dir / video["path"])
    assert frames.shape == (video["frames"], 64, 64, 3) and video["frames"] == 50


def test_log_lines_go_through_tqdm_write(monkeypatch):
    """Log lines are written with tqdm.write, so they never end up glued to a progress bar."""
    import logging

    from tqdm import tqdm

    from runners.common import _StderrHandler

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw:
                                                   written.append(s)))
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.emit(logging.LogRecord("runners", logging.INFO, __file__, 1, "step %d", (5,), None))
    assert written == ["runners: step 5"]


def test_evaluation_episodes_show_progress(monkeypatch):
    """run_episodes with a label shows a (transient) bar over the episodes' agent steps."""
    import io

    import torch

    import runners.rollouts as rollouts
    from rlcore.envs import EnvpoolVecEnv

    bars = []
    real = rollouts.tqdm

    def spy(**kw):
        bar = real(**{**kw, "disable": kw["disable"] or False, "file": io.StringIO()})
        bars.append((kw["desc"], kw["total"], kw["disable"], bar))
        return bar

    monkeypatch.setattr(rollouts, "tqdm", spy)

    class Zero:
        def act(self, obs, is_first, eval_mode=True, use_planner=True):
            return torch.zeros(obs.shape[0], env.spec.action_dim)

    env = EnvpoolVecEnv("cartpole-balance", num_envs=2, max_episode_steps=20)
    try:
        rollouts.run_episodes(env, Zero(), progress="eval (planner, 2 episodes)")
        rollouts.run_episodes(env, Zero())
    finally:
        env.close()
    (desc, total, disable, bar), (_, _, off, _) = bars
    assert desc == "eval (planner, 2 episodes)" and total == env.spec.episode_length == 10
    assert disable is None and bar.n == 10  # shown on a terminal, one tick per agent step
    assert off is True  # no label: no bar
