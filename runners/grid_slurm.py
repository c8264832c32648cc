"""The Slurm executor: cells as one job array through submitit; a preempted or timed-out
job is requeued and resumes from the cell's checkpoint."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
from rlcore.config import REPO_ROOT
from runners.grid_exec import CellResult, CellTask, Executor, Report, require, run_cell
from runners.grid_spec import GridError


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
        mem_gb, gpus_per_node: per-job resources (None / 0: not requested); each cell is
            its own array job, so `gpus_per_node = 1` gives every cell one GPU.
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
        require("submitit", "slurm", "'submitit>=1.5'")
        if shutil.which("sbatch") is None:
            raise GridError("sbatch not found on PATH: the slurm executor submits with "
                            "Slurm's client tools; run on a cluster's login node (or load "
                            "its slurm module), or choose --executor=local or ray")

    def describe(self, num_cells: int) -> str:
        part = f", partition {self.partition}" if self.partition else ""
        g = self.gpus_per_node
        gpus = f", {g} GPU{'s' * (g != 1)} per job" if g else ""
        return f"slurm, one job array, {self._cpus_per('job', num_cells)}{gpus}{part}"

    def _folder(self) -> Path:
        if self.folder:
            return Path(self.folder)
        base = self.grid_dir or Path("runs")
        return base / "slurm" / time.strftime("%Y%m%d-%H%M%S")

    def job_parameters(self, num_cells: int) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters of the job array (its `#SBATCH` lines)."""
        _, threads = self.resources(num_cells)
        params: dict[str, Any] = {
            "job_name": "grid", "time": self.timeout_min, "cpus_per_task": threads,
            "array_parallelism": self.max_workers or num_cells,
            "setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        }
        if self.partition:
            params["partition"] = self.partition
        if self.mem_gb:
            params["mem"] = f"{int(self.mem_gb * 1024)}MB"
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        return {**params, **self.slurm_params}

    def execute(self, tasks: list[CellTask], report: Report) -> None:
        import submitit

        folder = self._folder()
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.max_requeues)
        try:
            ex.update_parameters(**self.job_parameters(len(tasks)))
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
