"""End-to-end tests of `python -m runners.online` in subprocesses (CleanRL / Dopamine style).

Each run uses gin/test/tiny.gin on top of a real experiment file, with envpool's
cartpole-balance, so a whole run takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import signal_after_first_checkpoint

pytest.importorskip("envpool")

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--gin_file=gin/tdmpc2_dog.gin", "--gin_file=gin/test/tiny.gin",
        "--gin_param=TASK = 'cartpole-balance'"]


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "runners.online", *BASE, f"--run_dir={run_dir}", *extra]


def _run(run_dir, *extra, timeout=300):
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(_cmd(run_dir, *extra), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("online") / "run"
    proc = _run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_run_leaves_artifacts(finished_run):
    run_dir, proc = finished_run
    # the run dir, the run's length and how to resume, said at the start
    assert (f"run dir {run_dir}: env step 0 of 1200; resume with: python -m runners.online "
            f"--run_dir={run_dir}") in proc.stderr
    assert (run_dir / "config.gin").read_text().count("OnlineRunner.") > 5
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    lines = (run_dir / "eval.csv").read_text().splitlines()
    assert lines[0].startswith("step,reward,seed")
    assert lines[-1].startswith("1200,")
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists() and (ckpts[-1] / "state.pt").exists()
    assert ckpts[-1].name.endswith("1200")


def test_config_gin_alone_rebuilds_the_run(finished_run, tmp_path):
    """Resuming needs only the run dir: config.gin is read back when no --gin_file is given."""
    run_dir, _ = finished_run
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.run([sys.executable, "-m", "runners.online", f"--run_dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stderr


def test_different_config_is_refused_and_nothing_changes(finished_run):
    run_dir, _ = finished_run
    before = _snapshot(run_dir)
    proc = _run(run_dir, "--gin_param=OnlineRunner.seed = 7")
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "OnlineRunner.seed" in proc.stderr
    assert _snapshot(run_dir) == before


def test_truncated_checkpoint_is_an_error(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run[0], run_dir)
    latest = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "state.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    before = _snapshot(run_dir)
    proc = _run(run_dir)
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and str(latest.parent.name) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("extra, expected", [
    (["--gin_param=TASK = 'dog-rn'"], "dog-run"),
    (["--gin_param=MPPIPlaner.horizon = 3"], "MPPIPlanner"),
    (["--gin_param=MPPIPlanner.horizn = 3"], "horizon"),
    (["--gin_file=gin/does_not_exist.gin"], "not found"),
])
def test_bad_input_gets_one_clear_error(tmp_path, extra, expected):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_malformed_gin_file(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("OnlineRunner.seed = = 3\nthis is not gin\n")
    proc = _run(tmp_path / "run", f"--gin_file={bad}")
    assert proc.returncode == 2
    assert "bad.gin" in proc.stderr and "Traceback" not in proc.stderr


def test_list_components():
    proc = subprocess.run([sys.executable, "-m", "runners.online", "--list_components"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "@planners.MPPIPlanner" in proc.stdout and "temperature = 0.5" in proc.stdout
    assert "@envs.EnvpoolVecEnv" in proc.stdout


@pytest.mark.slow  # long: run by .ci/run's second pass (-m 'slow or slurm or ray')
def test_killed_run_resumes(tmp_path):
    """kill -9 after the first checkpoint; the same command resumes from it and finishes."""
    run_dir = tmp_path / "run"
    extra = ["--gin_param=OnlineRunner.total_env_steps = 4000",
             "--gin_param=OnlineRunner.checkpoint_every = 400",
             "--gin_param=OnlineRunner.eval_every = 800"]
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.Popen(_cmd(run_dir, *extra), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [p for p in ckpt_dir.glob("step_*") if (p / "COMPLETE").exists()] \
            if ckpt_dir.exists() else []
        if any(int(p.name.split("_")[1]) >= 1200 for p in done):
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_before = sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*")
                          if (p / "COMPLETE").exists())
    assert steps_before and steps_before[-1] < 4000
    resumed = _run(run_dir, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from env step {steps_before[-1]}" in resumed.stderr
    rows = [ln.split(",") for ln in (run_dir / "eval.csv").read_text().splitlines()[1:]]
    steps = [int(r[0]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 4000
    assert sorted(ckpt_dir.glob("step_*"))[-1].name.endswith("4000")
    # the schedule carries on from the checkpoint: no extra checkpoint right after resuming
    assert all(int(p.name.split("_")[1]) % 400 == 0 for p in ckpt_dir.glob("step_*"))


def _state(d: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                    p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_finished_run_is_a_no_op(finished_run):
    """Re-running a finished run says so, with its last evaluation, and writes nothing."""
    run_dir, _ = finished_run
    before = _state(run_dir)
    proc = _run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is finished (env step 1200 of 1200)" in proc.stderr
    assert "last evaluation at env step 1200: return" in proc.stderr
    assert _state(run_dir) == before


def test_restart_without_checkpoint_says_so_and_purges(finished_run, tmp_path):
    """A run dir without a complete checkpoint restarts from 0, says so in one line, and
    leaves no duplicate eval.csv rows."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    proc = _run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds no complete checkpoint: starting from env step 0" in proc.stderr
    rows = (run_dir / "eval.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1200"]


def test_resume_meets_new_start_states(finished_run, tmp_path):
    """The envs of a resumed run are seeded from the resume point, not with the run's seed
    (which would replay the run's first start states after every resume)."""
    import shutil

    import gin

    from rlcore.config import load_gin
    from rlcore.types import OBS

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run[0], run_dir)
    load_gin([str(run_dir / "config.gin")], [], finalize=False)
    try:
        from runners.pipelines import OnlineRunner

        runner = OnlineRunner(str(run_dir))
        runner._maybe_resume()
        assert runner.env_step == 1200
        resumed = runner.env.reset()[OBS]
        runner.env.close()
        first = runner.env_factory(seed=runner.seed).reset()[OBS]  # the run's first starts
        assert not torch_allclose(first, resumed)
    finally:
        gin.clear_config()


def torch_allclose(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.allclose(a, b))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                       (signal.SIGUSR2, 140)])
def test_signal_checkpoints_and_exits(tmp_path, sig, code):
    """SIGTERM/SIGINT/SIGUSR2: finish the step, checkpoint, one line on how to resume, exit
    128 + signal; the same command then resumes from that checkpoint."""
    run_dir = tmp_path / "run"
    extra = ["--gin_param=OnlineRunner.total_env_steps = 100_000",
             "--gin_param=OnlineRunner.checkpoint_every = 500",
             "--gin_param=OnlineRunner.eval_every = 0",
             "--gin_param=OnlineRunner.eval_episodes = 0"]
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    rc, stderr, last = signal_after_first_checkpoint(
        _cmd(run_dir, *extra), run_dir, sig, tmp_path / "stderr.txt", cwd=ROOT, env=env)
    assert rc == code, stderr[-3000:]
    step = int(last.name.split("_")[1])
    line = [ln for ln in stderr.splitlines() if ln.startswith("stopped by")]
    assert len(line) == 1 and line[0].startswith(f"stopped by {sig.name} at env step {step} ")
    assert f"checkpoint written to {last};" in line[0]
    assert f"resume with: python -m runners.online --run_dir={run_dir}" in line[0]


# ---------------------------------------------------------------------------------------
# Refusals: exit 2, one message naming the parameter and the fix, nothing written.
# ---------------------------------------------------------------------------------------
def _main(argv, capsys):
    from runners import online

    code = online.main(argv)
    return code, capsys.readouterr().err


def _error_lines(err: str) -> list[str]:
    lines = err.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("error: "))
    return lines[start:]


@pytest.mark.parametrize("param, expected", [
    ("OnlineRunner.total_env_steps = 'abc'",
     "OnlineRunner.total_env_steps must be an integer >= 1, got 'abc'; fix the binding "
     "OnlineRunner.total_env_steps"),
    ("OnlineRunner.eval_episodes = 0",
     "or set OnlineRunner.eval_every = 0 to turn evaluation off"),
    ("OnlineRunner.checkpoint_every = -200",
     "OnlineRunner.checkpoint_every must be an integer >= 0, got -200"),
    ("OnlineRunner.utd_ratio = 'x'", "OnlineRunner.utd_ratio must be a finite number"),
    ("OnlineRunner.seed_steps = 1.5", "OnlineRunner.seed_steps must be an integer >= 0"),
    ("OnlineRunner.keep_checkpoints = 0", "OnlineRunner.keep_checkpoints must be an integer"),
])
def test_bad_runner_value_is_refused(tmp_path, capsys, param, expected):
    run_dir = tmp_path / "run"
    code, err = _main([*BASE, f"--gin_param={param}", f"--run_dir={run_dir}"], capsys)
    assert code == 2, err[-2000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "In call to configurable" not in err and "Traceback" not in err
    assert not run_dir.exists()


def test_no_evaluation_with_zero_episodes_is_valid(tmp_path):
    """eval_every = 0 with eval_episodes = 0 (the benchmark's bindings) turns evaluation off."""
    import gin

    from rlcore.config import load_gin

    load_gin(["gin/tdmpc2_dog.gin", "gin/test/tiny.gin"],
             ["TASK = 'cartpole-balance'", "OnlineRunner.eval_every = 0",
              "OnlineRunner.eval_episodes = 0"], finalize=False)
    try:
        from runners.pipelines import OnlineRunner

        runner = OnlineRunner(str(tmp_path / "run"))
        assert runner.eval_env is None
        runner.env.close()
    finally:
        gin.clear_config()
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    code, err = _main([*BASE, f"--run_dir={path}"], capsys)
    assert code == 2
    assert _error_lines(err) == [f"error: --run_dir {path} is a file, not a directory; pass "
                                 "a new or an existing run directory"]
    assert path.read_text() == "mine"


def test_read_only_run_dir(tmp_path, capsys, monkeypatch):
    import runners.base

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real = os.access
    monkeypatch.setattr(runners.base.os, "access",
                        lambda p, mode, **kw: False if Path(p) == run_dir else real(p, mode))
    code, err = _main([*BASE, f"--run_dir={run_dir}"], capsys)
    assert code == 2
    assert _error_lines(err) == [f"error: --run_dir {run_dir} is not writable (permission "
                                 "denied); fix its permissions or choose another --run_dir"]
    assert list(run_dir.iterdir()) == []


def test_full_disk_while_checkpointing(tmp_path, capsys, monkeypatch):
    """ENOSPC at the second checkpoint: one message (disk full, resumes from step 600), the
    first checkpoint intact, no half-written folder left."""
    import errno

    from rlcore import checkpointing

    run_dir = tmp_path / "run"
    real = checkpointing._HashingWriter.write

    def write(self, data):
        if list((run_dir / "checkpoints").glob("step_*/COMPLETE")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(checkpointing._HashingWriter, "write", write)
    code, err = _main([*BASE, f"--run_dir={run_dir}"], capsys)
    assert code == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    assert "the disk is full (ENOSPC)" in lines[0]
    assert "the run resumes from env step 600 (the last complete checkpoint)" in lines[0]
    assert f"python -m runners.online --run_dir={run_dir}" in lines[0]
    monkeypatch.undo()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000000600"]
    checkpointing.Checkpointer(run_dir / "checkpoints").verify()


@pytest.mark.parametrize("log_every", [10, 100_000])
def test_diverging_run_names_the_losses_and_writes_no_checkpoint(tmp_path, capsys, log_every):
    """lr = 1e20: NaN losses are caught at the logging cadence or, at the latest, before a
    checkpoint would save the diverged state."""
    run_dir = tmp_path / "run"
    code, err = _main([*BASE, "--gin_param=TDMPC2Agent.lr = 1e20",
                       f"--gin_param=OnlineRunner.log_every = {log_every}",
                       f"--run_dir={run_dir}"], capsys)
    assert code == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: non-finite loss at update ")
    assert "loss_" in lines[0] and "no checkpoint was written" in lines[0]
    assert not list(run_dir.glob("checkpoints/step_*"))


def test_pretraining_and_phases_show_progress(tmp_path, monkeypatch):
    """Pretraining (one long block of updates) has its own progress bar, and the main bar
    names the phase (seeding, then training) so its ETA follows the current phase."""
    import gin

    import runners.pipelines as pipelines
    from rlcore.config import load_gin
    from rlcore.logging import MetricLogger

    bars, phases = [], []
    real = pipelines.tqdm

    def spy(**kw):
        bars.append((kw.get("desc"), kw.get("total")))
        return real(**kw)

    monkeypatch.setattr(pipelines, "tqdm", spy)
    real_phase = MetricLogger.phase
    monkeypatch.setattr(MetricLogger, "phase",
                        lambda self, name: (phases.append(name), real_phase(self, name))[1])
    load_gin(["gin/tdmpc2_dog.gin", "gin/test/tiny.gin"],
             ["TASK = 'cartpole-balance'", "OnlineRunner.total_env_steps = 600"],
             finalize=False)
    try:
        runner = pipelines.OnlineRunner(str(tmp_path / "run"))
        runner.run()
    finally:
        gin.clear_config()
    assert bars == [("pretraining", 200)]
    assert phases[0] == "seeding" and phases[-1] == "training"
    assert sorted(set(phases)) == ["seeding", "training"]
