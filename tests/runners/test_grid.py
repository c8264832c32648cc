"""Ablation grids (`python -m runners.grid`): expansion, validation, the local, Slurm and Ray
executors for real, failure isolation, skip/resume on re-run, and the results summary.

Cells are tiny runs (gin/grids/tiny.gin: cartpole-balance, 2000 env steps, one thread
each). The Slurm tests bring up a real single-node cluster with tests/runners/slurm_up.sh
(marker `slurm`); the Ray tests start a real local cluster on 127.0.0.1 (marker `ray`).
Both skip with the reason when their engine is not installed (.ci/setup_distributed.sh).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runners import grid as grid_main
from runners import grid_local, grid_run, grid_spec, plot
from runners.grid_ray import RayExecutor
from runners.grid_slurm import SlurmExecutor

ROOT = Path(__file__).resolve().parents[2]
TINY = "gin/grids/tiny.gin"
SLURM_UP = ROOT / "tests" / "runners" / "slurm_up.sh"
PAPER_GPU = "gin/grids/paper_gpu.gin"
PAPER_TASKS = ("cartpole-swingup", "reacher-easy", "finger-spin", "walker-walk", "cheetah-run")
# A paper_gpu cell shrunk to seconds on a CPU (the bindings every cell gets from the command
# line): the tiny model, no compile, 400 env steps.
TINY_CELL = ["include 'gin/test/tiny.gin'", "TDMPC2Agent.compile = False",
             "OnlineRunner.total_env_steps = 400", "OnlineRunner.seed_steps = 100",
             "OnlineRunner.eval_every = 200", "OnlineRunner.eval_episodes = 2",
             "OnlineRunner.checkpoint_every = 400"]


def _grid(tmp_path: Path, name: str, body: str) -> Path:
    """A grid file in tmp_path layered on the tiny grid, with its root in tmp_path."""
    path = tmp_path / f"{name}.gin"
    path.write_text(f"include '{TINY}'\ngrid.name = '{name}'\ngrid.root = '{tmp_path / 'runs'}'\n"
                    + body)
    return path


def _run_grid(*args: str, env: dict | None = None, timeout: int = 300):
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "runners.grid", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _eval_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "eval.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_finished(cell_dir: Path, steps: int = 2000) -> None:
    assert (cell_dir / grid_spec.DONE_FILE).exists(), (cell_dir / "grid.log").read_text()[-2000:]
    assert grid_spec.cell_status(cell_dir, steps)[0] == "finished"
    assert _eval_steps(cell_dir)[-1] == steps


# --------------------------------------------------------------------------------------
# Expansion, naming, validation (in-process, no runs)
# --------------------------------------------------------------------------------------
def test_cells_are_named_from_the_axes(tmp_path):
    grid = grid_spec.Grid(
        base_files=["gin/tdmpc2_dog.gin"], seeds=[1, 2], name="g", root=str(tmp_path),
        axes={"planner": ["gin/ablations/planner/mppi.gin", "gin/ablations/planner/cem.gin"],
              "horizon": ["HORIZON = 3", "HORIZON = 5"],
              "reset": {"none": "TDMPC2Agent.reset = None",
                        "sp": ["gin/ablations/resets/shrink_perturb.gin",
                               "ShrinkPerturb.every = 10"]}},
        params=["OnlineRunner.eval_every = 10"])
    cells = grid.cells(["OnlineRunner.total_env_steps = 100"])
    assert len(cells) == 2 * 2 * 2 * 2
    assert [c.name for c in cells[:3]] == ["planner=mppi,horizon=3,reset=none/seed=1",
                                           "planner=mppi,horizon=3,reset=none/seed=2",
                                           "planner=mppi,horizon=3,reset=sp/seed=1"]
    cell = next(c for c in cells if c.name == "planner=cem,horizon=5,reset=sp/seed=2")
    assert cell.run_dir == tmp_path / "g" / "planner=cem,horizon=5,reset=sp" / "seed=2"
    assert cell.gin_files == ("gin/tdmpc2_dog.gin", "gin/ablations/planner/cem.gin",
                              "gin/ablations/resets/shrink_perturb.gin")
    # axis bindings, then grid.params, then the command line's, then seed and thread cap
    assert cell.params(threads=3) == [
        "HORIZON = 5", "ShrinkPerturb.every = 10", "OnlineRunner.eval_every = 10",
        "OnlineRunner.total_env_steps = 100", "OnlineRunner.seed = 2",
        "OnlineRunner.num_threads = 3"]
    argv = shlex.split(cell.command_line(threads=3))
    assert argv[:3] == ["python", "-m", "runners.online"] and argv[1:] == cell.argv(3)
    assert argv[-1] == f"--run_dir={cell.run_dir}"


def test_axis_errors_are_clear(tmp_path):
    g = grid_spec.Grid(base_files=["gin/tdmpc2_dog.gin"], root=str(tmp_path),
                      axes={"p": ["gin/a/cem.gin", "gin/b/cem.gin"]})
    with pytest.raises(grid_spec.GridError, match="both labelled 'cem'.*dict"):
        g.cells()
    with pytest.raises(grid_spec.GridError, match="axis 'p'"):
        grid_spec.Grid(base_files=["x.gin"], axes={"p": []}).cells()
    with pytest.raises(grid_spec.GridError, match="seeds"):
        grid_spec.Grid(base_files=["x.gin"], seeds=[1, 1])
    with pytest.raises(grid_spec.GridError, match="base files"):
        grid_spec.Grid(axes={"p": ["A = 1"]})


def test_command_line_bindings_are_routed():
    grid_level, cell_level = grid_spec.split_params([
        "grid.seeds = [1]", "LocalExecutor.max_workers = 2", "scope/grid.name = 'x'",
        "OnlineRunner.total_env_steps = 10", "TASK = 'cup-catch'"])
    assert grid_level == ["grid.seeds = [1]", "LocalExecutor.max_workers = 2",
                          "scope/grid.name = 'x'"]
    assert cell_level == ["OnlineRunner.total_env_steps = 10", "TASK = 'cup-catch'"]


@pytest.mark.parametrize("name,count", [("aux_heads", 6), ("planner", 6), ("resets", 9),
                                        ("tiny", 4), ("paper_gpu", 30),
                                        ("cpu_learning", 12)])
def test_shipped_grids_validate(name, count, tmp_path):
    grid, extra = grid_run.load_grid([f"gin/grids/{name}.gin"], [f"grid.root = '{tmp_path}'"])
    planned = grid.validate(grid.cells(extra))
    assert len(planned) == count and {p.status for p in planned} == {"new"}
    assert len({p.cell.run_dir for p in planned}) == count
    if name == "resets":
        assert {p.cell.condition for p in planned} == {
            "reset=none", "reset=shrink_perturb", "reset=full_heads"}
    if name == "tiny":
        assert {p.task for p in planned} == {"cartpole-balance"}
        assert {p.total_env_steps for p in planned} == {2000}
    if name == "paper_gpu":  # the paper's comparison: 5 tasks x aux off/on x 3 seeds
        assert sorted({p.task for p in planned}) == sorted(PAPER_TASKS)
        assert {p.total_env_steps for p in planned} == {100_000}  # env steps, repeat 2
        assert {p.cell.condition.split(",")[1] for p in planned} == {"aux=off", "aux=on"}
        assert {p.cell.seed for p in planned} == {1, 2, 3}
    if name == "cpu_learning":  # the CPU learning table: 3 tasks x aux off/on x 2 seeds
        assert sorted({p.task for p in planned}) == ["cartpole-swingup", "finger-spin",
                                                      "reacher-easy"]
        assert {p.total_env_steps for p in planned} == {50_000}
        assert {p.cell.condition.split(",")[1] for p in planned} == {"aux=off", "aux=on"}
        assert {p.cell.seed for p in planned} == {1, 2}


@pytest.mark.parametrize("axis,expected", [
    ("['gin/ablations/aux/on.gin', 'gin/ablations/aux/missing.gin']",
     r"cell aux=missing/seed=1: gin file not found: gin/ablations/aux/missing\.gin"),
    ("['gin/ablations/aux/on.gin', 'OnlineRunner.no_such_param = 3']",
     r"cell aux=3/seed=1: unknown parameter OnlineRunner\.no_such_param"),
    ("{'on': 'gin/ablations/aux/on.gin', 'typo': 'OnlineRuner.seed = 3'}",
     r"cell aux=typo/seed=1: unknown configurable 'OnlineRuner'"),
])
def test_invalid_cell_fails_before_anything_runs(axis, expected, tmp_path, capsys):
    path = _grid(tmp_path, "bad", f"grid.axes = {{'aux': {axis}}}\n")
    rc = grid_main.main([f"--gin_file={path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: 2 of 4 cells are invalid; nothing was run")
    assert re.search(expected, err), err
    assert "seed=2" in err  # every invalid cell is named
    assert not (tmp_path / "runs").exists()


def test_unknown_grid_binding_is_a_user_error(tmp_path, capsys):
    rc = grid_main.main([f"--gin_file={TINY}", "--gin_param=grid.sedes = [1]"])
    assert rc == 2 and "unknown parameter grid.sedes" in capsys.readouterr().err
    rc = grid_main.main([f"--gin_file={tmp_path / 'nope.gin'}"])
    assert rc == 2 and "gin file not found" in capsys.readouterr().err


def test_missing_sbatch_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    rc = grid_main.main([f"--gin_file={TINY}", f"--gin_param=grid.root = '{tmp_path / 'runs'}'",
                         "--executor=slurm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "sbatch not found" in err[0] or "needs submitit" in err[0]
    assert not (tmp_path / "runs").exists()


def test_unreachable_ray_address_is_one_clear_error(tmp_path, capsys):
    pytest.importorskip("ray")
    port = _free_port()
    rc = grid_main.main([f"--gin_file={TINY}", f"--gin_param=grid.root = '{tmp_path / 'runs'}'",
                         "--executor=ray", f"--ray_address=127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert not (tmp_path / "runs").exists()


def test_executor_from_binding_or_flag(monkeypatch):
    grid, _ = grid_run.load_grid([TINY], ["grid.executor = @RayExecutor()",
                                          "RayExecutor.address = '10.0.0.1:6379'"])
    ex = grid_run.make_executor(grid)
    assert isinstance(ex, RayExecutor) and ex.address == "10.0.0.1:6379"
    ex = grid_run.make_executor(grid, None, max_workers=3, threads_per_job=None)
    assert (type(ex), ex.address, ex.max_workers) == (RayExecutor, "10.0.0.1:6379", 3)
    assert type(grid_run.make_executor(grid, "slurm")) is SlurmExecutor
    monkeypatch.setattr(grid_local, "available_cpus", lambda: 8)
    local = grid_local.LocalExecutor
    assert local().resources(4) == (4, 2)       # sized to the machine
    assert local().resources(20) == (8, 1)
    assert local(threads_per_job=4).resources(20) == (2, 4)
    assert local(max_workers=2).resources(20) == (2, 4)
    with pytest.raises(grid_spec.GridError, match="max_workers must be a positive integer"):
        local(max_workers=0)


def test_flags_that_do_not_apply_are_refused(capsys):
    assert grid_main.main([f"--gin_file={TINY}", "--ray_address=127.0.0.1:1"]) == 2
    assert "--address do not apply to the local executor" in capsys.readouterr().err


def test_paper_grid_requests_one_gpu_per_cell(tmp_path):
    """Slurm: `--gpus-per-node=1` in the array's sbatch script (each cell is one array job);
    Ray: `num_gpus=1` per task. The grid file binds both."""
    submitit = pytest.importorskip("submitit")
    # without the grid's bindings nothing asks for a GPU
    assert "--gpus" not in submitit.slurm.slurm._make_sbatch_string(
        command="x", folder=tmp_path, **SlurmExecutor().job_parameters(2))
    assert RayExecutor().gpus_per_job == 0
    with pytest.raises(grid_spec.GridError, match="gpus_per_job must be a number >= 0"):
        RayExecutor(gpus_per_job=-1)
    grid, _ = grid_run.load_grid([PAPER_GPU])
    slurm = grid_run.make_executor(grid, "slurm")
    assert slurm.describe(30) == "slurm, one job array, 4 CPUs per job, 1 GPU per job"
    sbatch = submitit.slurm.slurm._make_sbatch_string(
        command="python -c pass", folder=tmp_path, map_count=30, **slurm.job_parameters(30))
    assert "#SBATCH --gpus-per-node=1\n" in sbatch and "#SBATCH --array=0-29%30\n" in sbatch
    assert "#SBATCH --cpus-per-task=4\n" in sbatch
    ray = grid_run.make_executor(grid, "ray", address="10.0.0.1:6379")
    assert ray.gpus_per_job == 1
    assert ray.describe(30) == "ray, 4 CPUs per task, 1 GPU per task, cluster at 10.0.0.1:6379"


def test_paper_grid_cell_runs_and_writes_its_curves(tmp_path):
    """One paper_gpu cell (cartpole-swingup, the paper's agent, seed 1), shrunk to a tiny model
    and 400 env steps: it starts, evaluates at env steps 200 and 400 (eval.csv and TensorBoard's
    eval/reward, both over env steps) and leaves its checkpoint."""
    grid, extra = grid_run.load_grid([PAPER_GPU], [f"grid.root = '{tmp_path}'", *TINY_CELL])
    cell = grid.cells(extra)[0]
    assert cell.name == "task=cartpole-swingup,aux=off/seed=1"
    proc = subprocess.run([sys.executable, *cell.argv(threads=1)], cwd=ROOT,
                          env={**os.environ, "MUJOCO_GL": "egl"}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (cell.run_dir / "eval.csv").read_text().splitlines()
    assert lines[0].startswith("step,reward,seed,")
    assert [ln.split(",")[0] for ln in lines[1:]] == ["200", "400"]
    assert {ln.split(",")[2] for ln in lines[1:]} == {"1"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cell.run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/reward")] == [200, 400]
    assert json.loads((cell.run_dir / "run.json").read_text())["spec"]["task"] == \
        "cartpole-swingup"
    assert grid_spec.cell_status(cell.run_dir, 400)[0] == "finished"


# --------------------------------------------------------------------------------------
# The local executor, for real: failure isolation, skip on re-run, resume
# --------------------------------------------------------------------------------------
LOCAL_AXES = ("grid.axes = {'variant': {'on': 'gin/ablations/aux/on.gin', "
              "'off': 'gin/ablations/aux/off.gin', "
              "'broken': 'OnlineRunner.utd_ratio = -1.0'}}\ngrid.seeds = [1]\n")


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    path = _grid(tmp, "local", LOCAL_AXES)
    start = time.time()
    proc = _run_grid(f"--gin_file={path}", "--max_workers=2", "--threads_per_job=1")
    return path, tmp / "runs" / "local", proc, time.time() - start


def test_local_grid_runs_cells_and_isolates_a_failure(local_grid):
    _, gdir, proc, _ = local_grid
    out = proc.stdout
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "executor: local, 2 at once x 1 thread" in out
    for name in ("variant=on", "variant=off"):
        _assert_finished(gdir / name / "seed=1")
        assert f"finished {name}/seed=1 in" in out
    broken = gdir / "variant=broken" / "seed=1"
    log = broken / "grid.log"
    assert f"FAILED   variant=broken/seed=1 (exit code 2); log: {log}" in out
    assert "utd_ratio" in log.read_text() and (broken / grid_spec.FAILED_FILE).exists()
    assert "grid local: 2/3 cells finished (2 ran, 0 already finished), 1 failed" in out
    assert "failed: variant=broken/seed=1: error: " in out
    # the thread cap reached the runner (config) and its environment
    cfg = (gdir / "variant=on" / "seed=1" / "config.gin").read_text()
    assert "OnlineRunner.num_threads = 1" in cfg
    header = (gdir / "variant=on" / "seed=1" / "grid.log").read_text().splitlines()[1]
    assert "--gin_param=\"OnlineRunner.num_threads = 1\"" in header


def test_rerun_skips_finished_cells(local_grid):
    path, gdir, _, _ = local_grid
    good = {n: _snapshot(gdir / n) for n in ("variant=on", "variant=off")}
    proc = _run_grid(f"--gin_file={path}", "--max_workers=2", "--threads_per_job=1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "status: 2 finished, 1 failed; 1 to run" in proc.stdout
    assert "[1/1] FAILED   variant=broken/seed=1" in proc.stdout
    assert "grid local: 2/3 cells finished (0 ran, 2 already finished), 1 failed" in proc.stdout
    assert {n: _snapshot(gdir / n) for n in good} == good


@pytest.mark.slow  # long: run by .ci/run's second pass (-m 'slow or slurm or ray')
def test_interrupted_cell_resumes_from_its_checkpoint(local_grid):
    """A run dir with a checkpoint but no final one (as a killed grid leaves it) resumes."""
    path, gdir, _, _ = local_grid
    cell = gdir / "variant=off" / "seed=1"
    (cell / grid_spec.DONE_FILE).unlink()
    final = max((cell / "checkpoints").glob("step_*"))
    shutil.rmtree(final)
    assert grid_spec.cell_status(cell, 2000) == ("interrupted", "resumes from step 1000")
    only_off = "--gin_param=grid.axes = {'variant': {'off': 'gin/ablations/aux/off.gin'}}"
    dry = _run_grid(f"--gin_file={path}", only_off, "--dry_run")
    assert dry.returncode == 0 and "interrupted variant=off/seed=1" in dry.stdout
    proc = _run_grid(f"--gin_file={path}", only_off, "--threads_per_job=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (cell / "grid.log").read_text()
    assert log.count("=== grid cell variant=off/seed=1") == 2
    assert "resumed" in log.split("=== grid cell")[-1] and "from env step 1000" in log
    _assert_finished(cell)
    assert _eval_steps(cell) == [1000, 2000]
    # everything finished now: nothing runs, exit code 0
    again = _run_grid(f"--gin_file={path}", only_off)
    assert again.returncode == 0 and "0 to run" in again.stdout


# --------------------------------------------------------------------------------------
# Results: table and plots
# --------------------------------------------------------------------------------------
def _write_run(run_dir: Path, seed: int, rows: list[tuple[int, float]], task="cartpole-balance"):
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"spec": {"task": task}, "seed": seed}))
    (run_dir / "eval.csv").write_text("step,reward,seed,episode_length\n" + "".join(
        f"{s},{r},{seed},500\n" for s, r in rows))


@pytest.fixture
def synthetic(tmp_path):
    gdir = tmp_path / "runs" / "synth"
    _write_run(gdir / "aux=on" / "seed=1", 1, [(1000, 10.0), (2000, 100.0)])
    _write_run(gdir / "aux=on" / "seed=2", 2, [(1000, 20.0), (2000, 200.0)])
    _write_run(gdir / "aux=off" / "seed=1", 1, [(1000, 5.0), (2000, 50.0)])
    _write_run(gdir / "aux=off" / "seed=2", 2, [(1000, 7.0)])  # lagging seed
    ref = tmp_path / "reference"
    (ref / "tdmpc2").mkdir(parents=True)
    (ref / "tdmpc2" / "cartpole-balance.csv").write_text(
        "step,reward,seed\n0,100,1\n1500,300,1\n3000,900,1\n0,200,2\n1500,500,2\n3000,950,2\n")
    (ref / "sac").mkdir()
    (ref / "sac" / "cup-catch.csv").write_text("step,reward,seed\n0,1,1\n")
    return gdir, ref


def test_summary_table_is_mean_and_std_over_seeds(synthetic):
    gdir, ref = synthetic
    curves = plot.scan(gdir)
    assert sorted((c.condition, c.seed) for c in curves) == [
        ("aux=off", 1), ("aux=off", 2), ("aux=on", 1), ("aux=on", 2)]
    reference = plot.load_reference(ref, {"cartpole-balance"})
    assert list(reference["cartpole-balance"]) == ["tdmpc2"]
    steps, rows = plot.summary_rows(curves, [1000, 2000], reference)
    cells = {r.condition: r.cells for r in rows}
    assert cells["aux=on"][1000] == pytest.approx((15.0, 7.0710678, 2))
    assert cells["aux=on"][2000] == pytest.approx((150.0, 70.710678, 2))
    # the latest evaluation at or before the step; seed 2 of aux=off has not reached 2000
    assert cells["aux=off"][2000] == pytest.approx((50.0, 0.0, 1))
    between = {r.condition: r.cells[1500] for r in plot.summary_rows(curves, [1500])[1]}
    assert between["aux=on"] == pytest.approx((15.0, 7.0710678, 2))
    assert between["aux=off"] == pytest.approx((5.0, 0.0, 1))
    # published curves only at their own evaluations (0, 1500, 3000 here): their value
    # at 0 is no figure for 1000
    assert cells["tdmpc2"][1000] is None and cells["tdmpc2"][2000] is None
    published = {r.condition: r.cells[1500] for r in plot.summary_rows(curves, [1500],
                                                                         reference)[1]}
    assert published["tdmpc2"] == pytest.approx((400.0, 141.42136, 2))
    table = plot.format_table(steps, rows)
    assert "cartpole-balance: eval reward, mean ± std over seeds" in table
    assert "15.0 ± 7.1 (2)" in table and "150.0 ± 70.7 (2)" in table
    assert "tdmpc2 (published)" in table
    assert plot.parse_steps("1k,2_000,1.5M") == [1000, 2000, 1_500_000]


def test_summary_plots_png_with_reference_curves(synthetic, tmp_path):
    gdir, ref = synthetic
    paths = plot.plot_curves(plot.scan(gdir), tmp_path / "plots",
                             plot.load_reference(ref, {"cartpole-balance"}))
    assert paths == [tmp_path / "plots" / "cartpole-balance.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 10_000


def test_plot_band_is_min_to_max_over_seeds(synthetic, tmp_path, monkeypatch):
    """The shaded band of each curve runs from the lowest to the highest seed (not mean ± std),
    for our runs and the published ones alike; the line is the mean."""
    import matplotlib.axes

    gdir, ref = synthetic
    bands, lines = {}, {}
    real_fill, real_plot = matplotlib.axes.Axes.fill_between, matplotlib.axes.Axes.plot

    def fake_plot(ax, x, y, *args, label=None, **kwargs):
        lines[label.split(" (")[0] if "published" not in label else "tdmpc2"] = list(y)
        return real_plot(ax, x, y, *args, label=label, **kwargs)

    def fake_fill(ax, x, y1, y2, **kwargs):
        bands[len(bands)] = (list(x), list(y1), list(y2))
        return real_fill(ax, x, y1, y2, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", fake_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", fake_fill)
    plot_dir = tmp_path / "plots"
    plot.plot_curves(plot.scan(gdir), plot_dir, plot.load_reference(ref, {"cartpole-balance"}),
                     max_step=3000)
    # conditions in order (aux=off, aux=on), then the published tdmpc2 curves
    assert bands[0] == ([1000, 2000], [5.0, 50.0], [7.0, 50.0])
    assert bands[1] == ([1000, 2000], [10.0, 100.0], [20.0, 200.0])
    assert bands[2] == ([0, 1500, 3000], [100.0, 300.0, 900.0], [200.0, 500.0, 950.0])
    assert lines["aux=on"] == [15.0, 150.0] and lines["tdmpc2"] == [150.0, 400.0, 925.0]


def test_grid_summarize_flag(synthetic, tmp_path, capsys):
    gdir, ref = synthetic
    path = tmp_path / "synth.gin"
    path.write_text(f"include '{TINY}'\ngrid.name = 'synth'\ngrid.root = '{gdir.parent}'\n")
    rc = grid_main.main([f"--gin_file={path}", "--summarize", "--steps=1k,2k",
                         f"--reference_dir={ref}", f"--plot_dir={tmp_path / 'png'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "grid synth: 4/4 cells have results" in out
    assert "aux=on " in out and "15.0 ± 7.1 (2)" in out and "tdmpc2 (published)" in out
    assert (tmp_path / "png" / "cartpole-balance.png").exists()
    # and the last evaluation of every run: its env step and return
    last = out.split("last evaluation of each run")[1].splitlines()
    assert re.fullmatch(r"task\s+condition\s+seed\s+env step\s+reward", last[1].strip())
    assert [ln.split() for ln in last[3:7]] == [
        ["cartpole-balance", "aux=off", "1", "2000", "50.0"],
        ["cartpole-balance", "aux=off", "2", "1000", "7.0"],   # the lagging seed
        ["cartpole-balance", "aux=on", "1", "2000", "100.0"],
        ["cartpole-balance", "aux=on", "2", "2000", "200.0"]]
    # a missing reference dir is skipped with a note
    rc = grid_main.main([f"--gin_file={path}", "--summarize", f"--reference_dir={tmp_path / 'x'}",
                         f"--plot_dir={tmp_path / 'png2'}"])
    out = capsys.readouterr().out
    assert rc == 0 and "no published curves" in out and "(published)" not in out
    assert (tmp_path / "png2" / "cartpole-balance.png").exists()


def test_summary_of_a_grid_with_a_task_axis(tmp_path, capsys):
    """A task axis (as in gin/grids/paper_gpu.gin) names the task in each run dir; tables and
    legends group runs by task already, so the condition drops that part, and cells are
    matched to their results by run dir."""
    gdir = tmp_path / "runs" / "tasks"
    _write_run(gdir / "task=cartpole-balance,aux=on" / "seed=1", 1, [(1000, 10.0)])
    _write_run(gdir / "task=cup-catch,aux=on" / "seed=1", 1, [(1000, 30.0)], task="cup-catch")
    path = tmp_path / "tasks.gin"
    path.write_text(f"include '{TINY}'\ngrid.name = 'tasks'\ngrid.root = '{gdir.parent}'\n"
                    "grid.seeds = [1]\ngrid.axes = {'task': [\"TASK = 'cartpole-balance'\", "
                    "\"TASK = 'cup-catch'\"], 'aux': ['gin/ablations/aux/on.gin', "
                    "'gin/ablations/aux/off.gin']}\n")
    rc = grid_main.main([f"--gin_file={path}", "--summarize", f"--reference_dir={tmp_path}",
                         f"--plot_dir={tmp_path / 'png'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "grid tasks: 2/4 cells have results" in out
    assert ("without results yet: task=cartpole-balance,aux=off/seed=1, "
            "task=cup-catch,aux=off/seed=1") in out
    assert {(c.task, c.condition) for c in plot.scan(gdir)} == {
        ("cartpole-balance", "aux=on"), ("cup-catch", "aux=on")}
    assert "task=" not in out.split("without results yet")[1].split("\n", 1)[1]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "cartpole-balance.png", "cup-catch.png"]


# --------------------------------------------------------------------------------------
# Slurm, for real: a single-node cluster from Debian's packages
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None:
        pytest.skip("slurmctld/slurmd not installed (run .ci/setup_distributed.sh)")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root here (slurmd runs the jobs)")
    pytest.importorskip("submitit")
    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    up = subprocess.run(["bash", str(SLURM_UP), str(d)], env=env, capture_output=True,
                        text=True, timeout=120, check=False)
    if up.returncode != 0:
        pytest.fail(f"could not bring up Slurm: {up.stderr[-2000:]}")
    yield {"SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run(["bash", str(SLURM_UP), "--down", str(d)], timeout=60, check=False)


def _job_of(log: Path) -> str | None:
    m = re.search(r"\| slurm job (\S+) \|", log.read_text()) if log.exists() else None
    return m.group(1) if m else None


@pytest.mark.slurm
def test_slurm_grid_job_array_with_preemption(slurm_cluster, tmp_path):
    """Two cells as one job array; one job is preempted (SIGTERM, then USR2, as submitit's
    own `_interrupt` does) after its first checkpoint, is requeued, and resumes."""
    path = _grid(tmp_path, "slurm", "grid.seeds = [1]\n")
    env = {**slurm_cluster}
    grid = subprocess.Popen(
        [sys.executable, "-m", "runners.grid", f"--gin_file={path}", "--executor=slurm",
         "--gin_param=OnlineRunner.checkpoint_every = 500"], cwd=ROOT,
        env={**os.environ, "MUJOCO_GL": "egl", **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    cell = tmp_path / "runs" / "slurm" / "aux=off" / "seed=1"
    deadline = time.time() + 120
    while time.time() < deadline and not list((cell / "checkpoints").glob("step_*")):
        assert grid.poll() is None, grid.communicate()
        time.sleep(0.2)
    job = _job_of(cell / "grid.log")
    assert job and "_" in job, "cells should run as a job array"
    # TERM reaches every process of the job step; USR2 a moment later (were it to overtake
    # TERM, TERM would kill submitit's `scontrol requeue` in flight).
    for sig in ("TERM", "USR2"):
        subprocess.run(["scancel", f"--signal={sig}", job], env={**os.environ, **env}, check=True)
        time.sleep(2)
    out, err = grid.communicate(timeout=240)
    assert grid.returncode == 0, out + err
    assert "submitted 2 Slurm jobs" in out
    assert "grid slurm: 2/2 cells finished (2 ran, 0 already finished), 0 failed" in out
    for name in ("aux=on", "aux=off"):
        _assert_finished(tmp_path / "runs" / "slurm" / name / "seed=1")
    log = (cell / "grid.log").read_text()
    assert log.count("=== grid cell aux=off/seed=1") == 2, log
    assert "resumed" in log.split("=== grid cell")[-1]
    submission = next((tmp_path / "runs" / "slurm" / "slurm").glob("*/*_submission.sh"))
    assert "#SBATCH --array=0-1%2" in submission.read_text()


# --------------------------------------------------------------------------------------
# Ray, for real: a local cluster bound to 127.0.0.1
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    pytest.importorskip("ray")
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--num-gpus=1",  # declared, not real: Ray hands it out by CUDA_VISIBLE_DEVICES
         f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail("the local Ray head did not start")
            time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    # Stop the head and what it started (its own session), nothing else. `ray start` drains
    # for up to 30 s on SIGTERM; a test cluster need not.
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()


@pytest.mark.ray
def test_ray_grid_runs_cells_as_tasks(ray_cluster, tmp_path):
    path = _grid(tmp_path, "ray", "grid.seeds = [1]\n")
    proc = _run_grid(f"--gin_file={path}", "--executor=ray", f"--ray_address={ray_cluster}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"executor: ray, 1 CPU per task, cluster at {ray_cluster}" in proc.stdout
    assert "grid ray: 2/2 cells finished (2 ran, 0 already finished), 0 failed" in proc.stdout
    for name in ("aux=on", "aux=off"):
        cell = tmp_path / "runs" / "ray" / name / "seed=1"
        _assert_finished(cell)
        assert "| ray task " in (cell / "grid.log").read_text()


@pytest.mark.ray
def test_ray_grid_gives_each_cell_a_gpu(ray_cluster, tmp_path):
    """`RayExecutor.gpus_per_job = 1` (as gin/grids/paper_gpu.gin binds it): Ray reserves the
    cluster's one GPU for the task and the cell's runner sees it in CUDA_VISIBLE_DEVICES."""
    path = _grid(tmp_path, "raygpu", "grid.seeds = [1]\n"
                 "grid.axes = {'aux': ['gin/ablations/aux/off.gin']}\n")
    proc = _run_grid(f"--gin_file={path}", "--executor=ray", f"--ray_address={ray_cluster}",
                     "--gin_param=RayExecutor.gpus_per_job = 1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"executor: ray, 1 CPU per task, 1 GPU per task, cluster at {ray_cluster}" in proc.stdout
    cell = tmp_path / "runs" / "raygpu" / "aux=off" / "seed=1"
    _assert_finished(cell)
    header = (cell / "grid.log").read_text().splitlines()[0]
    assert "| ray task " in header and "| CUDA_VISIBLE_DEVICES=0 |" in header, header
