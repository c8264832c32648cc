"""The Ray executor: cells as Ray tasks on an existing cluster or a local one."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import gin
from rlcore.config import REPO_ROOT
from runners.grid_exec import (CellResult, CellTask, Executor, Report, available_cpus,
                               require, run_cell)
from runners.grid_spec import GridError


@gin.configurable
class RayExecutor(Executor):
    """Cells as Ray tasks on an existing cluster (`address`) or a local one.

    Args:
        address: `host:port` of a running cluster's GCS, `ray://host:port` (Ray Client) or
            `auto`; None starts a local cluster bound to 127.0.0.1 for the grid's lifetime.
        max_workers: tasks in flight at once (None: all; Ray schedules by CPUs).
        threads_per_job: `num_cpus` of each task (default 1).
        gpus_per_job: `num_gpus` of each task (0: none); Ray sets the task's
            CUDA_VISIBLE_DEVICES to the GPUs it reserved, and the cell's runner inherits it.
        num_cpus: CPUs of the local cluster (None: this machine's).
        temp_dir: the local cluster's temp dir (None: Ray's default, /tmp/ray).
        connect_timeout_s: how long to try reaching `address` before giving up.
        max_retries: Ray retries of a task whose worker died; a retry resumes the run.
    """

    kind = "ray"

    def __init__(self, address: str | None = None, max_workers: int | None = None,
                 threads_per_job: int | None = None, gpus_per_job: float = 0,
                 num_cpus: int | None = None, temp_dir: str | None = None,
                 connect_timeout_s: float = 10.0, max_retries: int = 2):
        super().__init__(max_workers, threads_per_job)
        if not isinstance(gpus_per_job, (int, float)) or gpus_per_job < 0:
            raise GridError(f"RayExecutor.gpus_per_job must be a number >= 0, got {gpus_per_job!r}")
        self.gpus_per_job = gpus_per_job
        self.address, self.num_cpus, self.temp_dir = address, num_cpus, temp_dir
        self.connect_timeout_s, self.max_retries = connect_timeout_s, max_retries

    def describe(self, num_cells: int) -> str:
        where = f"cluster at {self.address}" if self.address else "a local cluster on 127.0.0.1"
        return f"ray, {self._cpus_per('task', num_cells)}{self._gpus()}, {where}"

    def _gpus(self) -> str:
        g = self.gpus_per_job
        return f", {g:g} GPU{'s' * (g != 1)} per task" if g else ""

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
        require("ray", "ray", "'ray[tune]>=2.9'")
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
            remote = ray.remote(run_cell).options(num_cpus=threads, num_gpus=self.gpus_per_job,
                                                  max_retries=self.max_retries)
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
