"""Ablation grids from gin overrides: expand, validate, plan, execute, resume, summarize.

A grid file binds only the `grid` configurable (STYLE.md §7):

    grid.name = 'planner'
    grid.base_files = ['gin/tdmpc2_dog.gin']
    grid.axes = {
        'planner': ['gin/ablations/planner/mppi.gin', 'gin/ablations/planner/cem.gin'],
        'horizon': ['HORIZON = 3', 'HORIZON = 5'],
    }
    grid.seeds = [1, 2, 3]

An axis value is a fragment file (a path ending in `.gin`), a binding string, or a list of
either; an axis can also be a dict `{label: value}` to name its values. Each cell is one
`python -m runners.online` run in `<root>/<name>/<axis>=<label>,.../seed=<s>`, with the
flags `--gin_file` (base files, then the axis files), `--gin_param` (axis bindings,
`grid.params`, the command line's cell bindings, `OnlineRunner.seed`, the thread cap) and
`--run_dir`.

Before anything runs, every cell's gin files and bindings are parsed exactly as the run
will parse them (nothing is built); an invalid cell is an error that names it. A cell is
*finished* when its run dir holds a complete checkpoint at `total_env_steps` or the `DONE`
marker written after it exited 0; finished cells are skipped. Any other cell runs with the
same command, and the runner resumes it from its newest checkpoint. Each cell's output
goes to `<cell>/grid.log`; a failing cell is reported with that path and never stops the
others.

Executors (swappable, gin-configurable; `grid.executor = @SlurmExecutor()` or the
`--executor` flag of `runners.grid`): `LocalExecutor` (a process pool sized to the
machine), `SlurmExecutor` (submitit job arrays; a preempted or timed-out job is requeued
and resumes from the cell's checkpoint), `RayExecutor` (Ray tasks on an existing cluster or
a local one).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import fcntl
import inspect
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
from rlcore.config import REPO_ROOT, ConfigError, load_gin

__all__ = ["Cell", "CellResult", "CellTask", "Executor", "Grid", "GridError", "GridOutcome",
           "LocalExecutor", "PlannedCell", "RayExecutor", "SlurmExecutor", "cell_status",
           "format_plan", "load_grid", "make_executor", "run_cell", "run_grid", "split_params"]

LOG_FILE = "grid.log"
DONE_FILE = "DONE"
FAILED_FILE = "FAILED"
LOCK_FILE = ".grid.lock"
RUNNER_MODULE = "runners.online"
# Configurables bound by grid files; any other --gin_param of runners.grid goes to every cell.
GRID_CONFIGURABLES = ("grid", "LocalExecutor", "SlurmExecutor", "RayExecutor")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class GridError(RuntimeError):
    """A problem with a grid (its file, a cell, an executor) that the user must fix."""


# --------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: a condition (axis labels) and a seed."""

    condition: str                # 'aux=on,planner=cem' ('' without axes)
    seed: int
    gin_files: tuple[str, ...]
    gin_params: tuple[str, ...]   # without the seed and thread bindings
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.condition}/seed={self.seed}" if self.condition else f"seed={self.seed}"

    def params(self, threads: int | None = None) -> list[str]:
        out = [*self.gin_params, f"OnlineRunner.seed = {self.seed}"]
        if threads:
            out.append(f"OnlineRunner.num_threads = {threads}")
        return out

    def argv(self, threads: int | None = None) -> list[str]:
        """The runner's arguments after the interpreter: `-m runners.online ...`."""
        return (["-m", RUNNER_MODULE] + [f"--gin_file={f}" for f in self.gin_files]
                + [f"--gin_param={p}" for p in self.params(threads)]
                + [f"--run_dir={self.run_dir}"])

    def command_line(self, threads: int | None = None) -> str:
        return _shell_join(["python", *self.argv(threads)])


def _shell_join(args: Sequence[str]) -> str:
    """Like shlex.join, but `--flag="a = 'b'"` instead of `'--flag=a = '"'"'b'"'"''`."""
    out = []
    for a in args:
        flag, eq, value = a.partition("=")
        if (eq and a.startswith("--") and shlex.quote(a) != a
                and not any(ch in value for ch in '"$`\\!')):
            out.append(f'{flag}="{value}"')
        else:
            out.append(shlex.quote(a))
    return " ".join(out)


def _label(value: str | Sequence[str]) -> str:
    """A readable directory-safe label: a fragment's stem or a binding's value."""
    if not isinstance(value, str):
        return "+".join(_label(v) for v in value)
    if value.strip().endswith(".gin"):
        text = Path(value.strip()).stem
    else:
        text = value.split("=", 1)[1] if "=" in value else value
        text = text.strip().strip("'\"").lstrip("@").replace("()", "")
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")
    return text[:60] or "value"


def _items(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(
        value, (list, tuple)) else None
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise GridError(f"{where}: an axis value must be a gin file path, a binding string or a "
                        f"list of them, got {value!r}")
    return [v.strip() for v in items]


def _is_file(item: str) -> bool:
    return item.endswith(".gin") and "=" not in item


def split_params(params: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split command-line bindings into (grid-level, cell-level) ones.

    A binding of `grid`, `LocalExecutor`, `SlurmExecutor` or `RayExecutor` configures the
    grid; any other binding (a macro, `OnlineRunner.total_env_steps = ...`) goes to every
    cell, after the grid file's own `grid.params`.
    """
    grid_level, cell_level = [], []
    for p in params:
        m = re.match(r"\s*(?:[\w.]+/)*([\w.]+)\.\w+\s*=", p)
        name = m.group(1).rsplit(".", 1)[-1] if m else None
        (grid_level if name in GRID_CONFIGURABLES else cell_level).append(p)
    return grid_level, cell_level


# --------------------------------------------------------------------------------------
# Cell status and execution (runs wherever the executor runs it: stdlib only)
# --------------------------------------------------------------------------------------
def _complete_checkpoints(run_dir: Path) -> list[int]:
    steps = []
    for d in (run_dir / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "COMPLETE").exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _lock_held(run_dir: Path) -> bool:
    """Whether another process holds the cell's lock (the cell is running somewhere)."""
    path = run_dir / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def cell_status(run_dir: Path, total_env_steps: int) -> tuple[str, str]:
    """(status, detail): finished, running, interrupted, failed, started or new."""
    run_dir = Path(run_dir)
    steps = _complete_checkpoints(run_dir)
    done = _read_json(run_dir / DONE_FILE)
    if (steps and steps[-1] >= total_env_steps) or done.get("total_env_steps", -1) >= total_env_steps:
        return "finished", f"step {steps[-1] if steps else done['total_env_steps']}"
    if _lock_held(run_dir):
        return "running", "another process holds its lock"
    failed = _read_json(run_dir / FAILED_FILE)
    resume = f", resumes from step {steps[-1]}" if steps else ""
    if failed:
        return "failed", f"exit code {failed.get('exit_code')} last time{resume}"
    if steps:
        return "interrupted", f"resumes from step {steps[-1]}"
    if run_dir.exists() and any(run_dir.iterdir()):
        return "started", "no checkpoint yet; starts over"
    return "new", ""


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
                      f" | {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                      f"$ cd {shlex.quote(task.cwd)} && {_shell_join(['python', *task.argv])}\n")
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


# --------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------
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

    def check(self) -> None:
        """Raise GridError when the executor cannot run anything (before any submission)."""

    def execute(self, tasks: list[CellTask], report: Report) -> None:
        raise NotImplementedError


@gin.configurable
class LocalExecutor(Executor):
    """A pool of runner processes on this machine, sized to its CPUs.

    By default min(CPUs, cells) cells run at once with CPUs // that many threads each;
    `threads_per_job` alone gives CPUs // threads_per_job workers.
    """

    kind = "local"

    def resources(self, num_cells: int) -> tuple[int, int]:
        cpus = available_cpus()
        if self.max_workers:
            workers = self.max_workers
        elif self.threads_per_job:
            workers = max(1, cpus // self.threads_per_job)
        else:
            workers = max(1, min(cpus, num_cells))
        threads = self.threads_per_job or max(1, cpus // max(1, min(workers, num_cells)))
        return workers, threads

    def describe(self, num_cells: int) -> str:
        return super().describe(num_cells) + f" ({available_cpus()} CPUs)"

    def execute(self, tasks: list[CellTask], report: Report) -> None:
        workers, _ = self.resources(len(tasks))
        live: set[subprocess.Popen] = set()
        stop = threading.Event()
        guard = threading.Lock()

        def track(proc: subprocess.Popen) -> None:
            with guard:
                live.add(proc)
            if stop.is_set():
                proc.terminate()

        def work(task: CellTask) -> CellResult | None:
            if stop.is_set():
                return None
            return run_cell(task, on_start=track)

        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grid-cell")
        try:
            pending = {pool.submit(work, t) for t in tasks}
            while pending:
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    if fut.result() is not None:
                        report(fut.result())
        except BaseException:  # Ctrl-C or SIGTERM: stop the running cells, start no more
            stop.set()
            with guard:
                for proc in live:
                    if proc.poll() is None:
                        proc.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _require(module: str, executor: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise GridError(f"the {executor} executor needs {module}: pip install {extra} "
                        "(or pip install -e '.[grid]')") from None


class _SubmititCell:
    """The callable a Slurm job runs; `checkpoint` makes a preempted or timed-out job requeue
    (submitit) and the requeued job resumes the run from its newest checkpoint.

    Preemption signals the whole job: the runner may die of SIGTERM before submitit's
    USR2 handler requeues the job, so a runner killed by a signal waits `grace_s` for it.
    """

    grace_s = 30.0

    def __call__(self, task: CellTask) -> CellResult:
        result = run_cell(task)
        if result.returncode is not None and result.returncode < 0:
            time.sleep(self.grace_s)  # a USR2 arriving now requeues the job (and exits)
        return result

    def checkpoint(self, task: CellTask) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


@gin.configurable
class SlurmExecutor(Executor):
    """Cells as one Slurm job array through submitit.

    Args:
        partition: Slurm partition (None: the cluster's default).
        folder: where submitit keeps its job files and logs (None: `<grid>/slurm/<time>`;
            job ids restart on a fresh cluster, so each submission gets a fresh folder).
        timeout_min: time limit per job; a job reaching it is requeued (at most
            `max_requeues` times) and resumes from its checkpoint.
        max_workers: array tasks running at once (Slurm's `%` array throttle).
        threads_per_job: `--cpus-per-task` of each job (default 1).
        mem_gb, gpus_per_node: per-job resources (None / 0: not requested).
        slurm_params: any other submitit SlurmExecutor parameter (`{'qos': 'high'}`).
        poll_s: seconds between job-state checks.
    """

    kind = "slurm"

    def __init__(self, partition: str | None = None, folder: str | None = None,
                 timeout_min: int = 24 * 60, max_workers: int | None = None,
                 threads_per_job: int | None = None, mem_gb: float | None = None,
                 gpus_per_node: int = 0, max_requeues: int = 3,
                 slurm_params: Mapping[str, Any] | None = None, poll_s: float = 1.0):
        super().__init__(max_workers, threads_per_job)
        self.partition, self.folder, self.timeout_min = partition, folder, timeout_min
        self.mem_gb, self.gpus_per_node, self.max_requeues = mem_gb, gpus_per_node, max_requeues
        self.slurm_params, self.poll_s = dict(slurm_params or {}), poll_s

    def check(self) -> None:
        _require("submitit", "slurm", "'submitit>=1.5'")
        if shutil.which("sbatch") is None:
            raise GridError("sbatch not found on PATH: the slurm executor submits with "
                            "Slurm's client tools; run on a cluster's login node (or load "
                            "its slurm module), or choose --executor=local or ray")

    def describe(self, num_cells: int) -> str:
        _, threads = self.resources(num_cells)
        limit = f", at most {self.max_workers} at once" if self.max_workers else ""
        part = f", partition {self.partition}" if self.partition else ""
        return f"slurm, one job array, {threads} CPU{'s' * (threads > 1)} per job{limit}{part}"

    def _folder(self) -> Path:
        if self.folder:
            return Path(self.folder)
        base = self.grid_dir or Path("runs")
        return base / "slurm" / time.strftime("%Y%m%d-%H%M%S")

    def execute(self, tasks: list[CellTask], report: Report) -> None:
        import submitit

        _, threads = self.resources(len(tasks))
        folder = self._folder()
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.max_requeues)
        params: dict[str, Any] = {
            "job_name": "grid", "time": self.timeout_min, "cpus_per_task": threads,
            "array_parallelism": self.max_workers or len(tasks),
            "setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        }
        if self.partition:
            params["partition"] = self.partition
        if self.mem_gb:
            params["mem"] = f"{int(self.mem_gb * 1024)}MB"
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        try:
            ex.update_parameters(**{**params, **self.slurm_params})
            jobs = ex.map_array(_SubmititCell(), tasks)
        except (subprocess.CalledProcessError, RuntimeError, ValueError, OSError) as e:
            detail = getattr(e, "stderr", None) or getattr(e, "output", None) or str(e)
            if isinstance(detail, bytes):
                detail = detail.decode(errors="replace")
            first = next((ln for ln in str(detail).splitlines() if ln.strip()), str(e))
            raise GridError(f"Slurm submission failed: {first.strip()}") from None
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        print(f"submitted {len(jobs)} Slurm job{'s' * (len(jobs) > 1)} (job "
              f"{', '.join(ids)}; submitit folder {folder})", flush=True)
        by_job = dict(zip(jobs, tasks))
        gone_since: dict[Any, float] = {}
        try:
            while by_job:
                states = self._queue_states(ids)
                for job, task in list(by_job.items()):
                    if job.paths.result_pickle.exists():  # not job.done(): it runs sacct
                        report(self._result(job, task))
                        del by_job[job]
                    elif states is not None and states.get(job.job_id, "GONE") in _SLURM_ENDED:
                        # No result file although Slurm says the job ended (cancelled, timed
                        # out, out of memory); without accounting submitit would wait forever.
                        first = gone_since.setdefault(job, time.time())
                        if time.time() - first > 15:
                            state = states.get(job.job_id, "no longer in the queue")
                            report(CellResult(task.name, None, 0.0, task.log_path,
                                              error=f"Slurm job {job.job_id} ended ({state}) "
                                              f"without a result; see {job.paths.stderr}"))
                            del by_job[job]
                time.sleep(self.poll_s)
        except BaseException:
            for job in by_job:
                job.cancel(check=False)
            if by_job:
                print(f"cancelled {len(by_job)} Slurm job(s)", file=sys.stderr, flush=True)
            raise

    @staticmethod
    def _queue_states(ids: list[str]) -> dict[str, str] | None:
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)],
                                 capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return {} if "Invalid job id" in out.stderr else None
        return dict(ln.split(None, 1) for ln in out.stdout.splitlines() if " " in ln)

    @staticmethod
    def _result(job: Any, task: CellTask) -> CellResult:
        try:
            return job.result()
        except Exception as e:  # noqa: BLE001 - the job failed outside run_cell
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            return CellResult(task.name, None, 0.0, task.log_path,
                              error=f"Slurm job {job.job_id}: {first.strip()[:300]} "
                              f"(see {job.paths.stderr})")


_SLURM_ENDED = {"GONE", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@gin.configurable
class RayExecutor(Executor):
    """Cells as Ray tasks on an existing cluster (`address`) or a local one.

    Args:
        address: `host:port` of a running cluster's GCS, `ray://host:port` (Ray Client) or
            `auto`; None starts a local cluster bound to 127.0.0.1 for the grid's lifetime.
        max_workers: tasks in flight at once (None: all; Ray schedules by CPUs).
        threads_per_job: `num_cpus` of each task (default 1).
        num_cpus: CPUs of the local cluster (None: this machine's).
        temp_dir: the local cluster's temp dir (None: Ray's default, /tmp/ray).
        connect_timeout_s: how long to try reaching `address` before giving up.
        max_retries: Ray retries of a task whose worker died; a retry resumes the run.
    """

    kind = "ray"

    def __init__(self, address: str | None = None, max_workers: int | None = None,
                 threads_per_job: int | None = None, num_cpus: int | None = None,
                 temp_dir: str | None = None, connect_timeout_s: float = 10.0,
                 max_retries: int = 2):
        super().__init__(max_workers, threads_per_job)
        self.address, self.num_cpus, self.temp_dir = address, num_cpus, temp_dir
        self.connect_timeout_s, self.max_retries = connect_timeout_s, max_retries

    def describe(self, num_cells: int) -> str:
        _, threads = self.resources(num_cells)
        limit = f", at most {self.max_workers} at once" if self.max_workers else ""
        where = f"cluster at {self.address}" if self.address else "a local cluster on 127.0.0.1"
        return f"ray, {threads} CPU{'s' * (threads > 1)} per task{limit}, {where}"

    def _token_auth(self) -> None:
        """Ray >= 2.5x clusters use token auth when a token exists (`ray start` turns it on
        then); a driver joining one must opt in too, before ray is imported. A token-mode
        driver also joins a cluster without auth, so opt in whenever a token is at hand."""
        if self.address and "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules and (
                os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists()):
            os.environ["RAY_AUTH_MODE"] = "token"

    def check(self) -> None:
        self._token_auth()
        _require("ray", "ray", "'ray[tune]>=2.9'")
        if not self.address or self.address == "auto":
            return
        hostport = self.address.split("://", 1)[-1]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise GridError(f"Ray address {self.address!r} is not host:port (or ray://host:port "
                            "or auto)")
        try:
            socket.create_connection((host, int(port)), timeout=self.connect_timeout_s).close()
        except OSError as e:
            raise GridError(f"cannot reach the Ray cluster at {self.address} ({e.strerror or e}); "
                            "start it with `ray start --head`, fix --ray_address, or leave it "
                            "out to run on a local Ray cluster") from None

    def _init(self) -> Any:
        self._token_auth()
        import ray

        env_vars = {"PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": False,
                                  "logging_level": "warning"}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs.update(num_cpus=self.num_cpus or available_cpus(), include_dashboard=False,
                          _node_ip_address="127.0.0.1")
            if self.temp_dir:
                kwargs["_temp_dir"] = str(Path(self.temp_dir).resolve())
        try:
            ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises many types for one problem
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
            hint = (" (a cluster with token authentication needs its token: RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token)") if self.address else ""
            raise GridError(f"could not connect to {where}: {first.strip()[:300]}{hint}") from None
        return ray

    def execute(self, tasks: list[CellTask], report: Report) -> None:
        ray = self._init()
        try:
            _, threads = self.resources(len(tasks))
            remote = ray.remote(run_cell).options(num_cpus=threads, max_retries=self.max_retries)
            limit = self.max_workers or len(tasks)
            queue, in_flight = list(tasks), {}
            try:
                while queue or in_flight:
                    while queue and len(in_flight) < limit:
                        task = queue.pop(0)
                        in_flight[remote.remote(task)] = task
                    ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                    for ref in ready:
                        task = in_flight.pop(ref)
                        try:
                            report(ray.get(ref))
                        except ray.exceptions.RayError as e:
                            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
                            report(CellResult(task.name, None, 0.0, task.log_path,
                                              error=f"Ray task failed: {first.strip()[:300]}"))
            except BaseException:
                for ref in in_flight:  # raises KeyboardInterrupt in the task: it stops the run
                    ray.cancel(ref)
                raise
        finally:
            ray.shutdown()


EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "slurm": SlurmExecutor,
                                        "ray": RayExecutor}


# --------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class PlannedCell:
    cell: Cell
    total_env_steps: int
    task: str
    status: str = "new"
    detail: str = ""


def _runner_default(param: str) -> Any:
    from runners.pipelines import OnlineRunner

    return inspect.signature(OnlineRunner.__init__).parameters[param].default


def _query(binding: str, default: Callable[[], Any]) -> Any:
    try:
        return gin.query_parameter(binding)
    except (ValueError, KeyError):
        return default()


@gin.configurable("grid")
class Grid:
    """An ablation grid: base gin files x axes of fragments/bindings x seeds.

    Args:
        base_files: gin files every cell loads first (the experiment, presets).
        axes: `{axis: [value, ...]}` or `{axis: {label: value}}`; a value is a fragment
            file, a binding string or a list of them. Cells are the product of the axes.
        seeds: one cell per seed and condition (`OnlineRunner.seed`).
        name: the grid's name (its directory under `root`); None: the grid file's stem.
        root: where grids live; cells go to `<root>/<name>/<condition>/seed=<s>`.
        params: bindings for every cell, after the axes' values.
        executor: an executor (`@LocalExecutor()`, `@SlurmExecutor()`, `@RayExecutor()`);
            None: local. The `--executor` flag of runners.grid overrides it.
    """

    def __init__(self, base_files: Sequence[str] = (), axes: Mapping[str, Any] | None = None,
                 seeds: Sequence[int] = (1,), name: str | None = None,
                 root: str = "runs/grids", params: Sequence[str] = (),
                 executor: Executor | Callable[..., Executor] | None = None):
        self.base_files = [str(f) for f in base_files]
        self.axes = dict(axes or {})
        self.seeds = list(seeds)
        self.name, self.root = name, root
        self.params = list(params)
        self.executor = executor
        if not self.base_files:
            raise GridError("the grid has no base files: bind grid.base_files = ['gin/...'] in "
                            "the grid file")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise GridError(f"grid.seeds must be a non-empty list of distinct integers, got "
                            f"{list(seeds)!r}")
        for p in self.params:
            if not isinstance(p, str):
                raise GridError(f"grid.params must hold binding strings, got {p!r}")

    @property
    def directory(self) -> Path:
        return Path(self.root) / (self.name or "grid")

    def _axis_values(self, axis: str, values: Any) -> list[tuple[str, list[str]]]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(axis)):
            raise GridError(f"axis name {axis!r}: use letters, digits, '_', '.' or '-' (it "
                            "names run directories)")
        where = f"axis {axis!r}"
        if isinstance(values, Mapping):
            out = [(str(k), _items(v, f"{where}, value {k!r}")) for k, v in values.items()]
            bad = [lab for lab, _ in out if not re.fullmatch(r"[A-Za-z0-9_.+-]+", lab)]
            if bad:
                raise GridError(f"{where}: label {bad[0]!r} must use letters, digits, "
                                "'_', '.', '+' or '-'")
        elif isinstance(values, (list, tuple)) and values:
            out = [(_label(v), _items(v, where)) for v in values]
        else:
            raise GridError(f"{where}: give a non-empty list of values or a dict "
                            f"{{label: value}}, got {values!r}")
        labels = [lab for lab, _ in out]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dupes:
            raise GridError(f"{where}: two values are both labelled {dupes[0]!r}; give the axis "
                            "as a dict {label: value} to name them")
        return out

    def cells(self, extra_params: Sequence[str] = ()) -> list[Cell]:
        """The product of the axes (in order) x seeds, seeds innermost."""
        axes = [(a, self._axis_values(a, v)) for a, v in self.axes.items()]
        out = []
        for combo in itertools.product(*[vals for _, vals in axes]):
            condition = ",".join(f"{a}={lab}" for (a, _), (lab, _) in zip(axes, combo))
            items = [i for _, its in combo for i in its]
            files = [*self.base_files, *[i for i in items if _is_file(i)]]
            params = [*[i for i in items if not _is_file(i)], *self.params, *extra_params]
            for seed in self.seeds:
                run_dir = self.directory / condition / f"seed={seed}" if condition \
                    else self.directory / f"seed={seed}"
                out.append(Cell(condition, seed, tuple(files), tuple(params), run_dir))
        return out

    def validate(self, cells: Sequence[Cell]) -> list[PlannedCell]:
        """Parse every cell's config as its run will (building nothing) and read its status.

        Raises GridError listing each invalid cell by name.
        """
        planned, errors = [], []
        try:
            for cell in cells:
                try:
                    load_gin(cell.gin_files, cell.params(threads=1), finalize=False)
                except ConfigError as e:
                    errors.append(f"cell {cell.name}: {str(e).strip().splitlines()[0]}")
                    continue
                total = int(_query("OnlineRunner.total_env_steps",
                                   lambda: _runner_default("total_env_steps")))
                task = str(_query("%TASK", lambda: "unknown"))
                status, detail = cell_status(cell.run_dir, total)
                planned.append(PlannedCell(cell, total, task, status, detail))
        finally:
            gin.clear_config()
        if errors:
            raise GridError(f"{len(errors)} of {len(cells)} cells are invalid; nothing was run:\n  "
                            + "\n  ".join(errors))
        return planned


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
