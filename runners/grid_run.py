"""Running a grid: load it, choose its executor (`grid.executor = @SlurmExecutor()` or
the `--executor` flag of runners.grid), plan its cells and run the unfinished ones, each
reported as it ends; a failing cell never stops the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlcore.config import REPO_ROOT, load_gin
from runners.grid_exec import CellResult, CellTask, Executor
from runners.grid_local import LocalExecutor
from runners.grid_ray import RayExecutor
from runners.grid_slurm import SlurmExecutor
from runners.grid_spec import Grid, GridError, PlannedCell, split_params

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "slurm": SlurmExecutor,
                                        "ray": RayExecutor}


def _saved_threads(run_dir: Path) -> int | None:
    """The thread count a started cell's config.gin recorded (its config must match)."""
    try:
        m = re.search(r"^OnlineRunner\.num_threads\s*=\s*(\d+)\s*$",
                      (run_dir / "config.gin").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def make_task(planned: PlannedCell, threads: int) -> CellTask:
    """The executable form of a cell: absolute paths, thread caps in the environment."""
    cell = planned.cell
    cell_threads = _saved_threads(cell.run_dir) or threads
    env = {v: str(threads) for v in _THREAD_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                        if p)
    env.setdefault("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    return CellTask(name=cell.name, run_dir=str(cell.run_dir.resolve()),
                    argv=cell.argv(cell_threads), cwd=os.getcwd(), env=env,
                    total_env_steps=planned.total_env_steps)


def format_plan(grid: Grid, planned: Sequence[PlannedCell], executor: Executor) -> str:
    n = len(planned)
    axes = " x ".join(f"{a} ({len(v)})" for a, v in grid.axes.items())
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.status] = counts.get(p.status, 0) + 1
    todo = sum(v for k, v in counts.items() if k not in ("finished", "running"))
    _, threads = executor.resources(max(1, todo))
    lines = [(f"grid {grid.name}: {n} cells = {axes + ' x ' if axes else ''}seeds "
              f"{grid.seeds}; {grid.directory}"),
             f"executor: {executor.describe(max(1, todo))}",
             "status: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {todo} to run"]
    width = max(len(p.cell.name) + (len(p.detail) + 3 if p.detail else 0) for p in planned)
    for p in planned:
        label = f"{p.cell.name} ({p.detail})" if p.detail else p.cell.name
        lines.append(f"  {p.status:<11} {label:<{width}}  "
                     f"{p.cell.command_line(_saved_threads(p.cell.run_dir) or threads)}")
    return "\n".join(lines)


@dataclasses.dataclass
class GridOutcome:
    finished: list[str]
    skipped: list[str]
    failed: list[CellResult]
    not_run: list[str]
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_run


def run_grid(grid: Grid, planned: Sequence[PlannedCell], executor: Executor,
             out: Callable[[str], None] = print) -> GridOutcome:
    """Run every unfinished cell; report each as it ends; a failure never stops the others."""
    start = time.time()
    skipped = [p.cell.name for p in planned if p.status == "finished"]
    busy = [p.cell.name for p in planned if p.status == "running"]
    todo = [p for p in planned if p.status not in ("finished", "running")]
    _, threads = executor.resources(max(1, len(todo)))
    tasks = [make_task(p, threads) for p in todo]
    finished, failed = [], []
    executor.grid_dir = grid.directory
    count = itertools.count(1)

    def report(r: CellResult) -> None:
        i = next(count)
        if r.ok:
            finished.append(r.name)
            out(f"[{i}/{len(tasks)}] finished {r.name} in {r.wall_s:.1f} s")
        else:
            failed.append(r)
            why = f"exit code {r.returncode}" if r.returncode is not None else "did not run"
            out(f"[{i}/{len(tasks)}] FAILED   {r.name} ({why}); log: {r.log_path}"
                + (f"\n          {r.error}" if r.error else ""))

    if tasks:
        executor.execute(tasks, report)
    reported = set(finished) | {r.name for r in failed}
    not_run = busy + [t.name for t in tasks if t.name not in reported]
    outcome = GridOutcome(finished, skipped, failed, not_run, time.time() - start)
    out(f"grid {grid.name}: {len(finished) + len(skipped)}/{len(planned)} cells finished "
        f"({len(finished)} ran, {len(skipped)} already finished), {len(failed)} failed"
        + (f", {len(not_run)} not run" if not_run else "") + f"; wall {outcome.wall_s:.1f} s")
    for r in failed:
        out(f"  failed: {r.name}: {r.error or 'see the log'} (log: {r.log_path})")
    for name in busy:
        out(f"  not run: {name}: running in another process (its lock is held)")
    return outcome


def load_grid(files: Sequence[str], params: Sequence[str] = ()) -> tuple[Grid, list[str]]:
    """Parse grid files with their grid-level bindings; return the grid and the cell-level
    bindings from `params` (see `split_params`). Leaves the grid's gin config active."""
    if not files:
        raise GridError("no grid file given: pass --gin_file=gin/grids/<grid>.gin")
    grid_params, cell_params = split_params(params)
    load_gin(files, grid_params, finalize=False)
    try:
        grid = Grid()
    except TypeError as e:
        raise GridError(f"{files[-1]} does not define a grid ({e}); bind grid.base_files, "
                        "grid.axes and grid.seeds there") from None
    if grid.name is None:
        grid.name = Path(files[-1]).stem
    return grid, cell_params


def make_executor(grid: Grid, kind: str | None = None, **overrides: Any) -> Executor:
    """The executor: `kind` (a flag) or the grid's binding or local, with flag overrides.

    Call while the grid's gin config is active, so `LocalExecutor.*` etc. bindings apply.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    bound = grid.executor
    if kind is not None:
        if kind not in EXECUTORS:
            raise GridError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
        cls: type[Executor] = EXECUTORS[kind]
    elif isinstance(bound, Executor):
        if not overrides:
            return bound
        cls = type(bound)
    elif isinstance(bound, type) and issubclass(bound, Executor):
        cls = bound
    elif bound is None:
        cls = LocalExecutor
    else:
        raise GridError(f"grid.executor must be @LocalExecutor(), @SlurmExecutor() or "
                        f"@RayExecutor(), got {bound!r}")
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in overrides if k not in accepted)
    if unknown:
        raise GridError(f"{', '.join('--' + k for k in unknown)} do not apply to the "
                        f"{cls.kind} executor")
    return cls(**overrides)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread, so cells are stopped cleanly."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
