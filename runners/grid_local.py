"""The local executor: a pool of runner processes on this machine."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import threading

import gin
from runners.grid_exec import CellResult, CellTask, Executor, Report, available_cpus, run_cell


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
