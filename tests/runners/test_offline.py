"""End-to-end tests of `python -m runners.export` and `python -m runners.offline`.

A tiny online run on envpool's cartpole-balance makes the dataset (exported with
runners.export); the offline runner then trains on it with gin/offline.gin and
gin/test/tiny.gin, validates on held-out episodes and evaluates in the env.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from tensordict import TensorDict

pytest.importorskip("envpool")

from components.replay.hdf5 import HDF5EpisodeDataset, write_episodes  # noqa: E402
from rlcore.config import load_gin  # noqa: E402
from rlcore.types import EnvSpec  # noqa: E402
from tests.conftest import signal_after_first_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
ONLINE = ["--gin_file=gin/tdmpc2_dog.gin", "--gin_file=gin/test/tiny.gin",
          "--gin_param=TASK = 'cartpole-balance'"]
FILES = ["gin/offline.gin", "gin/test/tiny.gin"]
PARAMS = ["TASK = 'cartpole-balance'",
          "OfflineRunner.total_updates = 60",
          "OfflineRunner.validation_fraction = 0.2",
          "OfflineRunner.validation_every = 20",
          "OfflineRunner.validation_batches = 2",
          "OfflineRunner.eval_every = 30",
          "OfflineRunner.eval_episodes = 1",
          "OfflineRunner.checkpoint_every = 30",
          "OfflineRunner.log_every = 10",
          "OfflineRunner.device = 'cpu'",
          "OfflineRunner.num_threads = 1",
          "OfflineRunner.progress = False"]


def _offline_cmd(run_dir, *extra, params=PARAMS):
    return [sys.executable, "-m", "runners.offline", *(f"--gin_file={f}" for f in FILES),
            *(f"--gin_param={p}" for p in params), f"--run_dir={run_dir}", *extra]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("online") / "run"
    proc = _run([sys.executable, "-m", "runners.online", *ONLINE, f"--run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def dataset(online_run):
    out = online_run.parent / "replay.h5"
    proc = _run([sys.executable, "-m", "runners.export", f"--run_dir={online_run}",
                 f"--out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def offline_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("offline") / "run"
    proc = _run(_offline_cmd(run_dir, f"--dataset={dataset}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


# ---------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------
def test_export_holds_the_online_replay(online_run, dataset):
    data = HDF5EpisodeDataset(dataset)
    info = data.info
    assert info.task == "cartpole-balance" and info.obs_shape == (5,) and info.action_dim == 1
    assert info.action_repeat == 2 and info.episode_length == 50
    # tiny.gin: 1200 env steps over 2 envs, 50-agent-step episodes: all 12 episodes ended.
    assert info.num_episodes == 12 and info.env_steps == 1200
    assert info.meta["source"] == str(online_run.resolve())
    assert info.meta["checkpoint"].endswith("1200") and info.meta["source_env_step"] == 1200
    state = torch.load(sorted((online_run / "checkpoints").glob("step_*"))[-1] / "state.pt",
                       weights_only=True)
    rows = state["replay"]["rows"]
    with h5py.File(dataset, "r") as f:
        assert torch.equal(torch.from_numpy(f["obs"][...]), rows["obs"])
        assert torch.equal(torch.from_numpy(f["action"][...]).nan_to_num(9),
                           rows["action"].nan_to_num(9))


def test_export_refuses_to_overwrite_and_bad_run_dirs(online_run, dataset, tmp_path, capsys):
    from runners import export

    before = dataset.read_bytes()
    assert export.main([f"--run_dir={online_run}", f"--out={dataset}"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert dataset.read_bytes() == before
    assert export.main([f"--run_dir={tmp_path}", f"--out={tmp_path / 'x.h5'}"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


# ---------------------------------------------------------------------------------------
# Offline training.
# ---------------------------------------------------------------------------------------
def test_offline_run_leaves_artifacts(offline_run, dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, proc = offline_run
    config = (run_dir / "config.gin").read_text()
    assert f"OfflineRunner.datasets = ['{dataset.resolve()}']" in config
    assert "loaded 10 training episodes" in proc.stderr  # 20% of 12 held out: 2 episodes
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "validation/loss_total" in tags and "validation/loss_consistency" in tags
    assert [e.step for e in acc.Scalars("validation/loss_total")] == [20, 40, 60]
    assert "loss/loss_total" in tags and "eval/reward" in tags
    lines = (run_dir / "eval.csv").read_text().splitlines()
    assert lines[0].startswith("step,reward,seed")
    assert [int(ln.split(",")[0]) for ln in lines[1:]] == [30, 60]  # steps are updates
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000000000030", "step_000000000060"]
    state = torch.load(ckpts[-1] / "state.pt", weights_only=True)
    assert "replay" not in state and state["agent"]["num_updates"] == 60  # no data stored


def test_config_alone_resumes_a_finished_run(offline_run, caplog):
    """Only --run_dir: config.gin rebuilds the run, which resumes at its end."""
    from runners import offline

    run_dir, _ = offline_run
    before = (run_dir / "eval.csv").read_text()
    caplog.set_level(logging.INFO, logger="runners")
    assert offline.main([f"--run_dir={run_dir}"]) == 0
    assert "from update 60" in caplog.text
    assert (run_dir / "eval.csv").read_text() == before
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[-1].endswith("60")


def _in_process(run_dir, dataset, params=()):
    from runners.offline_pipeline import OfflineRunner

    load_gin(FILES, [*PARAMS, f"OfflineRunner.datasets = ['{dataset}']", *params],
             finalize=False)
    runner = OfflineRunner(str(run_dir))
    runner.run()
    return runner


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_exact(dataset, tmp_path):
    """A run resumed from its update-30 checkpoint ends exactly like an uninterrupted one."""
    params = ["OfflineRunner.eval_episodes = 0"]
    _in_process(tmp_path / "a", dataset, params)
    _in_process(tmp_path / "b", dataset, params)
    final = tmp_path / "b" / "checkpoints" / "step_000000000060"
    assert final.exists()
    import shutil

    shutil.rmtree(final)  # as if killed between the checkpoints at 30 and 60
    resumed = _in_process(tmp_path / "b", dataset, params)
    assert resumed.num_updates == 60
    a = torch.load(tmp_path / "a" / "checkpoints" / "step_000000000060" / "state.pt",
                   weights_only=True)
    b = torch.load(final / "state.pt", weights_only=True)
    _assert_same(a, b)  # agent, optimizers, samplers, counters, RNG states


@pytest.mark.slow  # long: run by .ci/run's second pass (-m 'slow or slurm or ray')
def test_killed_run_resumes(dataset, tmp_path):
    """kill -9 after the first checkpoint; the same command resumes from it and finishes."""
    run_dir = tmp_path / "run"
    params = [*PARAMS, "OfflineRunner.total_updates = 200", "OfflineRunner.checkpoint_every = 10",
              "OfflineRunner.eval_every = 100", "OfflineRunner.validation_every = 50"]
    cmd = _offline_cmd(run_dir, f"--dataset={dataset}", params=params)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        if ckpt_dir.exists() and any((p / "COMPLETE").exists() for p in ckpt_dir.glob("step_*")):
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*")
                   if (p / "COMPLETE").exists())
    assert steps and steps[-1] < 200
    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from update {steps[-1]}" in resumed.stderr
    rows = [ln.split(",") for ln in (run_dir / "eval.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [100, 200]
    assert sorted(ckpt_dir.glob("step_*"))[-1].name.endswith("200")


# ---------------------------------------------------------------------------------------
# Bad input: exit code 2, one clear message naming the file and the fix, nothing written.
# ---------------------------------------------------------------------------------------
def _main(argv, capsys):
    from runners import offline

    code = offline.main(argv)
    return code, capsys.readouterr().err


def _argv(run_dir, *extra, params=PARAMS):
    return _offline_cmd(run_dir, *extra, params=params)[3:]


def test_truncated_dataset(dataset, tmp_path, capsys):
    cut = tmp_path / "cut.h5"
    data = dataset.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    code, err = _main(_argv(tmp_path / "run", f"--dataset={cut}"), capsys)
    assert code == 2 and str(cut) in err and "truncated" in err and "runners.export" in err
    assert not (tmp_path / "run").exists()


def test_dataset_missing_required_datasets(dataset, tmp_path, capsys):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(dataset.read_bytes())
    with h5py.File(broken, "a") as f:
        del f["terminated"]
    code, err = _main(_argv(tmp_path / "run", f"--dataset={broken}"), capsys)
    assert code == 2 and str(broken) in err and "terminated" in err
    assert not (tmp_path / "run").exists()


def test_env_that_does_not_fit_the_data(dataset, tmp_path, capsys):
    params = [p for p in PARAMS if not p.startswith("TASK")] + ["TASK = 'reacher-easy'"]
    code, err = _main(_argv(tmp_path / "run", f"--dataset={dataset}", params=params), capsys)
    assert code == 2 and "does not fit" in err and str(dataset) in err
    assert "(5,)" in err and "2-dim actions" in err and "TASK = 'cartpole-balance'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("obs_shape, action_dim, expected", [
    ((6,), 1, r"observations of shape (6,)"),
    ((5,), 3, "3-dim actions"),
])
def test_second_dataset_that_does_not_fit(dataset, tmp_path, capsys, obs_shape, action_dim,
                                          expected):
    spec = EnvSpec(obs_shape=obs_shape, action_dim=action_dim, episode_length=50)
    episode = TensorDict({"obs": torch.zeros(10, *obs_shape),
                          "action": torch.zeros(10, action_dim), "reward": torch.zeros(10),
                          "terminated": torch.zeros(10, dtype=torch.bool),
                          "episode": torch.zeros(10, dtype=torch.int64)}, batch_size=[10])
    other = tmp_path / "other.h5"
    write_episodes(other, [episode], spec)
    code, err = _main(_argv(tmp_path / "run", f"--dataset={dataset}", f"--dataset={other}"),
                      capsys)
    assert code == 2 and str(other) in err and expected in err
    assert not (tmp_path / "run").exists()


def test_missing_or_no_dataset(tmp_path, capsys):
    code, err = _main(_argv(tmp_path / "run", f"--dataset={tmp_path / 'nope.h5'}"), capsys)
    assert code == 2 and "nope.h5 does not exist" in err
    code, err = _main(_argv(tmp_path / "run"), capsys)
    assert code == 2 and "--dataset" in err
    assert not (tmp_path / "run").exists()


def test_changed_dataset_is_refused_on_resume(dataset, tmp_path, capsys):
    """Same config, but the file at the same path was re-written: nothing changes."""
    import shutil

    copy = tmp_path / "data.h5"
    shutil.copy(dataset, copy)
    run_dir = tmp_path / "run"
    _in_process(run_dir, copy, ["OfflineRunner.eval_episodes = 0",
                                "OfflineRunner.total_updates = 30"])
    data = HDF5EpisodeDataset(copy)
    write_episodes(copy, list(data.iter_episodes())[:-1], data.spec, overwrite=True)
    before = _snapshot(run_dir)
    code, err = _main([f"--run_dir={run_dir}"], capsys)
    assert code == 2 and "changed since the checkpoint" in err and str(copy) in err
    assert _snapshot(run_dir) == before


def test_sigterm_checkpoints_and_exits(dataset, tmp_path):
    """SIGTERM: finish the update, checkpoint, say how to resume, exit 143; then resume."""
    run_dir = tmp_path / "run"
    params = [*PARAMS, "OfflineRunner.total_updates = 100_000",
              "OfflineRunner.checkpoint_every = 10", "OfflineRunner.eval_every = 0",
              "OfflineRunner.eval_episodes = 0", "OfflineRunner.validation_every = 0"]
    cmd = _offline_cmd(run_dir, f"--dataset={dataset}", params=params)
    rc, stderr, last = signal_after_first_checkpoint(
        cmd, run_dir, signal.SIGTERM, tmp_path / "stderr.txt", cwd=ROOT, env=ENV)
    assert rc == 143, stderr[-3000:]
    step = int(last.name.split("_")[1])
    line = [ln for ln in stderr.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert len(line) == 1 and line[0].startswith(f"stopped by SIGTERM at update {step}:")
    assert f"resume with: python -m runners.offline --run_dir={run_dir}" in line[0]


def test_each_runner_help_is_its_own(capsys):
    """--help names the runner's own configurable and says what --run_dir does there."""
    from runners import export, offline, online

    for main, must, must_not in (
            (offline.main, ["'OfflineRunner.seed = 2'", "runs/offline-"], ["OnlineRunner"]),
            (online.main, ["'OnlineRunner.seed = 2'", "runs/online-"], ["OfflineRunner"]),
            (export.main, ["replay buffer is exported"], ["resumes", "--gin_param"])):
        if main is online.main:
            with pytest.raises(SystemExit):
                main(["--help"])
        else:
            assert main(["--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for s in must:
            assert s in text, (main.__module__, s)
        for s in must_not:
            assert s not in text, (main.__module__, s)


@pytest.mark.parametrize("param, expected", [
    ("OfflineRunner.total_updates = 'abc'",
     "OfflineRunner.total_updates must be an integer >= 1, got 'abc'; fix the binding "
     "OfflineRunner.total_updates"),
    ("OfflineRunner.checkpoint_every = -200",
     "OfflineRunner.checkpoint_every must be an integer >= 0, got -200"),
    ("OfflineRunner.validation_fraction = 1.5",
     "OfflineRunner.validation_fraction must be a finite number in [0, 1), got 1.5"),
])
def test_bad_runner_value_is_refused(dataset, tmp_path, capsys, param, expected):
    run_dir = tmp_path / "run"
    code, err = _main(_argv(run_dir, f"--dataset={dataset}", params=[*PARAMS, param]), capsys)
    assert code == 2, err[-2000:]
    lines = err[err.index("error: "):].splitlines()
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "In call to configurable" not in err and "Traceback" not in err
    assert not run_dir.exists()
