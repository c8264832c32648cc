"""What every grid executor shares: a cell's task and result, running it wherever the
executor runs it (output to `<cell>/grid.log`, the DONE/FAILED markers, the cell's lock),
and the `Executor` interface. Slurm jobs and Ray workers import this module and
runners.grid_spec to run a cell: both stay free of torch.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runners.grid_spec import DONE_FILE, FAILED_FILE, LOCK_FILE, LOG_FILE, GridError, shell_join


@dataclasses.dataclass
class CellTask:
    """What an executor needs to run one cell anywhere (picklable, paths absolute)."""

    name: str
    run_dir: str
    argv: list[str]             # after the interpreter
    cwd: str
    env: dict[str, str]
    total_env_steps: int

    @property
    def log_path(self) -> str:
        return str(Path(self.run_dir) / LOG_FILE)


@dataclasses.dataclass
class CellResult:
    name: str
    returncode: int | None      # None: did not run to an exit (lock held, engine error)
    wall_s: float
    log_path: str
    error: str = ""             # a one-line reason for a failure
    host: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _last_error_line(log_path: str) -> str:
    """The most telling line of a failed cell's log (an `error:` line, else the last one)."""
    try:
        lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("===")]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("error:") or re.match(r"\w+(Error|Exception)\b", ln):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def _job_label() -> str:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f" | slurm job {os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    if "SLURM_JOB_ID" in os.environ:
        return f" | slurm job {os.environ['SLURM_JOB_ID']}"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        return f" | ray task {ctx.get_task_id()} on node {ctx.get_node_id()[:12]}"
    return ""


def _gpu_label() -> str:
    """The GPUs this cell may use, as the scheduler set them (Slurm's gres, Ray's num_gpus)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" | CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""


def run_cell(task: CellTask, on_start: Callable[[subprocess.Popen], None] | None = None
             ) -> CellResult:
    """Run one cell's command, output appended to `<cell>/grid.log`; write DONE or FAILED.

    Holds the cell's lock while it runs (and passes it to the runner, so even an orphaned
    runner keeps it): a second grid never runs the same cell twice at once.
    """
    run_dir = Path(task.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    with open(run_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return CellResult(task.name, None, 0.0, task.log_path, host=host,
                              error="another process is running this cell (its lock is held)")
        start = time.time()
        with open(task.log_path, "a") as log:
            log.write(f"=== grid cell {task.name} | host {host} | pid {os.getpid()}{_job_label()}"
                      f"{_gpu_label()} | {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                      f"$ cd {shlex.quote(task.cwd)} && {shell_join(['python', *task.argv])}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, *task.argv], cwd=task.cwd,
                                    env={**os.environ, **task.env}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    pass_fds=(lock.fileno(),))
            try:
                if on_start is not None:
                    on_start(proc)
                rc = proc.wait()
            finally:  # interrupted (Ray cancel, Slurm requeue, Ctrl-C): stop the runner too
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            wall = time.time() - start
            log.write(f"=== exit code {rc} after {wall:.1f} s\n")
        marker = {"exit_code": rc, "wall_s": round(wall, 2), "host": host,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": task.argv,
                  "total_env_steps": task.total_env_steps}
        if rc == 0:
            (run_dir / DONE_FILE).write_text(json.dumps(marker, indent=1))
            (run_dir / FAILED_FILE).unlink(missing_ok=True)
            return CellResult(task.name, 0, wall, task.log_path, host=host)
        if rc > 0:  # killed by a signal (interrupted, preempted) is no verdict on the cell
            (run_dir / FAILED_FILE).write_text(json.dumps(marker, indent=1))
        return CellResult(task.name, rc, wall, task.log_path, host=host,
                          error=_last_error_line(task.log_path))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


Report = Callable[[CellResult], None]


class Executor:
    """Runs cell tasks and reports each result as it arrives.

    Args:
        max_workers: cells running at once (None: the executor's default).
        threads_per_job: CPU threads per cell (OMP/MKL and `OnlineRunner.num_threads`).
    """

    kind = "executor"

    def __init__(self, max_workers: int | None = None, threads_per_job: int | None = None):
        for name, v in (("max_workers", max_workers), ("threads_per_job", threads_per_job)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise GridError(f"{type(self).__name__}.{name} must be a positive integer, got {v!r}")
        self.max_workers, self.threads_per_job = max_workers, threads_per_job
        self.grid_dir: Path | None = None  # set by run_grid: where executor files may go

    def resources(self, num_cells: int) -> tuple[int, int]:
        """(cells at once, threads per cell)."""
        return self.max_workers or max(1, num_cells), self.threads_per_job or 1

    def describe(self, num_cells: int) -> str:
        workers, threads = self.resources(num_cells)
        return f"{self.kind}, {workers} at once x {threads} thread{'s' * (threads > 1)}"

    def _cpus_per(self, unit: str, num_cells: int) -> str:
        """`<n> CPUs per <unit>[, at most <max_workers> at once]`, for `describe`."""
        _, threads = self.resources(num_cells)
        limit = f", at most {self.max_workers} at once" if self.max_workers else ""
        return f"{threads} CPU{'s' * (threads > 1)} per {unit}{limit}"

    def check(self) -> None:
        """Raise GridError when the executor cannot run anything (before any submission)."""

    def execute(self, tasks: list[CellTask], report: Report) -> None:
        raise NotImplementedError


def require(module: str, executor: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise GridError(f"the {executor} executor needs {module}: pip install {extra} "
                        "(or pip install -e '.[grid]')") from None
