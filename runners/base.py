"""What every training runner shares: its run directory, resume, checkpoints, logging,
validation and evaluation. A runner adds its data source, its counters and `run`.

Each logged or saved step is `step` (env steps online, updates offline), so a run
directory reads the same whichever runner wrote it:

    run_dir/
      config.gin          operative gin config (resume and evaluation rebuild from it)
      run.json            env spec, seed, device, versions (and what the runner adds)
      eval.csv            step,reward,seed,...
      tb/                 TensorBoard events
      checkpoints/step_<n>/{state.pt, COMPLETE}
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import gin
import numpy as np
import torch
from tensordict import TensorDict

from rlcore.checkpointing import CheckpointError, Checkpointer
from rlcore.logging import MetricLogger
from rlcore.seeding import rng_state, seed_everything, set_rng_state
from runners.common import CONFIG_FILE, RunError, RunInterrupted, select_device, write_atomic
from runners.rollouts import run_episodes

_log = logging.getLogger("runners")


def _strip_comments(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def check_run_dir(run_dir: Path, operative_config: str) -> None:
    """Refuse a run dir whose saved config.gin differs from `operative_config`.

    Every saved binding must be unchanged. Bindings only the new config has (a parameter
    added to the code since, at its default) are accepted with a warning.
    """
    saved = run_dir / CONFIG_FILE
    if not saved.exists():
        return
    new = set(_strip_comments(operative_config))
    old = set(_strip_comments(saved.read_text()))
    if old - new:
        diff = [f"  - {ln}" for ln in sorted(old - new)] + [f"  + {ln}" for ln in sorted(new - old)]
        raise RunError(
            f"--run_dir {run_dir} holds a run with a different config:\n" + "\n".join(diff[:20])
            + "\nResume it with its own config (pass no --gin_file, or the same files and "
            "bindings), or choose a new --run_dir.")
    if new - old:
        _log.warning("resuming %s with bindings its config.gin lacks (new parameters at their "
                     "defaults): %s", run_dir, "; ".join(sorted(new - old)))


class RunnerBase:
    """The skeleton of a training runner; subclasses build `agent` (and their data) in
    `__init__`, then call `_open_run_dir`.

    Subclasses set `STEP_NAME` (what `step` counts), `SOURCE` (where the data come
    from, for error hints) and `COUNTERS` (attributes saved in checkpoints), and save and
    restore their data's state (replay, samplers) in `_data_state` / `_load_data_state`.
    """

    STEP_NAME = "update"
    SOURCE = "data"
    COUNTERS: tuple[str, ...] = ()
    ENTRY = "runners.offline"  # the module whose `--run_dir=` resumes this runner

    def __init__(self, run_dir: str, seed: int, device: str, num_threads: int | None,
                 progress: bool, log_every: int, validation_batches: int,
                 eval_policy_prior: bool):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.run_dir = Path(run_dir)
        self.seed, self.progress, self.log_every = seed, progress, log_every
        self.validation_batches, self.eval_policy_prior = validation_batches, eval_policy_prior
        self.device = select_device(device)
        self.stop_signal: int | None = None  # set by common.stop_on_signals
        self._last_losses: dict[str, torch.Tensor] = {}
        seed_everything(seed)

    @property
    def num_updates(self) -> int:
        return self.agent.num_updates

    @property
    def step(self) -> int:
        """The step of checkpoints, logs and eval.csv."""
        return self.num_updates

    def _position(self) -> str:
        """Where the run stands, for log lines and errors."""
        return f"{self.STEP_NAME} {self.step}"

    # -- run directory ----------------------------------------------------------------
    def _open_run_dir(self, keep_checkpoints: int) -> None:
        """Once everything is built (a bad config fails before anything is written)."""
        self._check_writable()
        self.operative_config = gin.operative_config_str()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=keep_checkpoints)
        check_run_dir(self.run_dir, self.operative_config)

    def _check_writable(self) -> None:
        """Refuse a --run_dir that is a file or cannot be written, before writing anything."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise RunError(f"--run_dir {run_dir} is a file, not a directory; pass a new or "
                           "an existing run directory")
        existing = run_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise RunError(f"--run_dir {run_dir} cannot be created: {existing} is a file; "
                           "choose another --run_dir")
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "--run_dir" if existing == run_dir else f"the parent folder {existing} of"
            raise RunError(f"{what} {run_dir} is not writable (permission denied); fix its "
                           "permissions or choose another --run_dir")

    def resume_command(self) -> str:
        return f"python -m {self.ENTRY} --run_dir={self.run_dir}"

    def _run_meta(self) -> dict[str, Any]:
        """What the runner adds to run.json."""
        return {}

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (self.run_dir / CONFIG_FILE).exists():
            write_atomic(self.run_dir / CONFIG_FILE, self.operative_config)
        meta = {"spec": self.spec.to_dict(), "seed": self.seed, "device": str(self.device),
                "torch": torch.__version__, **self._run_meta()}
        write_atomic(self.run_dir / "run.json", json.dumps(meta, indent=2))

    def _begin(self, total_steps: int) -> bool:
        """Resume from the newest complete checkpoint, write the run files, open the logs;
        False (and nothing written) when the run is already finished."""
        self._maybe_resume()
        if self.step >= total_steps:
            self._report_finished(total_steps)
            return False
        _log.info("run dir %s: %s %d of %d; resume with: %s", self.run_dir,
                  self.STEP_NAME, self.step, total_steps, self.resume_command())
        try:
            self._write_run_files()
        except OSError as e:
            raise RunError(f"cannot write the run files in --run_dir {self.run_dir}: "
                           f"{e.strerror or e}; choose another --run_dir") from None
        self.logger = MetricLogger(self.run_dir, total_steps=total_steps, seed=self.seed,
                                   progress=self.progress, resume_step=self.step)
        if self.step == 0:
            self.logger.config(self.operative_config)
        self._rate_mark = (time.perf_counter(), self.step)
        return True

    def _report_finished(self, total_steps: int) -> None:
        """Say that the run is done, with its last evaluation; write nothing."""
        last = ""
        try:
            with open(self.run_dir / "eval.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                last = (f"; last evaluation at {self.STEP_NAME} {rows[-1]['step']}: return "
                        f"{float(rows[-1]['reward']):.1f}")
        except (OSError, KeyError, ValueError):
            pass
        _log.info("run %s is finished (%s %d of %d)%s. Nothing to do; pass a new --run_dir "
                  "to train again", self.run_dir, self.STEP_NAME, self.step, total_steps, last)

    def _check_stop(self) -> None:
        """After a step: on SIGINT/SIGTERM/SIGUSR2 write a checkpoint and stop."""
        if self.stop_signal is None:
            return
        name = signal.Signals(self.stop_signal).name
        _log.info("got %s: writing a checkpoint, then stopping", name)
        self.save()
        self.logger.close()
        raise RunInterrupted(
            f"stopped by {name} at {self._position()}: checkpoint written to "
            f"{self.checkpointer.path_for(self.step)}; resume with: {self.resume_command()}",
            128 + self.stop_signal)

    def _advance(self, rate_name: str, times: dict[str, float]) -> None:
        """Move the progress bar on; every 30 s log `times` and the step rate under time/."""
        self.logger.advance(self.step)
        now, (then, then_step) = time.perf_counter(), self._rate_mark
        if now - then > 30:
            rate = (self.step - then_step) / (now - then)
            self.logger.scalars("time", {**times, rate_name: rate}, self.step)
            self._rate_mark = (now, self.step)

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"agent": self.agent.state_dict(), **self._data_state(),
                "counters": {name: getattr(self, name) for name in self.COUNTERS},
                "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self._load_data_state(state)
        for name, value in state["counters"].items():
            setattr(self, name, value)
        set_rng_state(state["rng"])

    def _maybe_resume(self) -> None:
        if self.checkpointer.latest() is None:
            if self.run_dir.is_dir() and any(self.run_dir.iterdir()):
                _log.info("%s holds no complete checkpoint: starting from %s 0 (earlier "
                          "TensorBoard points and eval.csv rows are purged)", self.run_dir,
                          self.STEP_NAME)
            return
        try:
            state = self.checkpointer.load()
        except CheckpointError as e:
            raise RunError(str(e)) from None
        self.load_state_dict(state)
        _log.info("resumed %s from %s", self.run_dir, self._position())

    def save(self) -> None:
        """Checkpoint, unless the latest update's losses are non-finite (the last checkpoint
        then stays the newest)."""
        self._check_losses(self._last_losses)
        try:
            self.checkpointer.save(self.step, self.state_dict())
        except OSError as e:
            steps = self.checkpointer.steps()
            resume = (f"the run resumes from {self.STEP_NAME} {steps[-1]} (the last complete "
                      "checkpoint)" if steps else f"no complete checkpoint yet: the run "
                      f"restarts from {self.STEP_NAME} 0")
            problem = ("the disk is full (ENOSPC)" if e.errno == errno.ENOSPC
                       else f"{e.strerror or e} (errno {e.errno})")
            raise RunError(
                f"cannot write the checkpoint at {self._position()} to "
                f"{self.checkpointer.directory}: {problem}. Free space (or fix the folder), "
                f"then resume with: {self.resume_command()}; {resume}") from None

    def _note_update(self, metrics: TensorDict) -> None:
        """Keep the latest update's losses (tensors: no host sync) for the checks."""
        self._last_losses = {k: v for k, v in metrics.items() if k.startswith("loss_")}

    def _check_losses(self, losses: dict[str, torch.Tensor]) -> None:
        if not losses:
            return
        finite = torch.isfinite(torch.stack([v.detach().reshape(()).float()
                                             for v in losses.values()])).tolist()
        bad = [k for k, ok in zip(losses, finite) if not ok]
        if bad:
            steps = self.checkpointer.steps()
            last = (f"the last checkpoint ({self.STEP_NAME} {steps[-1]}) in "
                    f"{self.checkpointer.directory} is intact" if steps
                    else "no checkpoint was written")
            raise RunError(
                f"non-finite loss at update {self.num_updates}"
                + ("" if self.STEP_NAME == "update" else f" ({self.STEP_NAME} {self.step})")
                + f": {', '.join(bad)}. The run diverged; {last}. Lower the learning rate "
                f"(e.g. TDMPC2Agent.lr) or check the {self.SOURCE}'s rewards/observations, "
                "and start a new --run_dir (a run dir resumes only with its own config).")

    # -- logging, validation, evaluation ----------------------------------------------
    def _log_update(self, metrics: TensorDict) -> None:
        values = dict(metrics.items())
        self._check_losses({k: v for k, v in values.items() if k.startswith("loss_")})
        self.logger.scalars("loss", {k: v for k, v in values.items() if k.startswith("loss_")},
                            self.step)
        for group, prefix in (("train", "stats/"), ("grad", "grad/")):
            self.logger.scalars(group, {k.split("/", 1)[1]: v for k, v in values.items()
                                        if k.startswith(prefix)}, self.step)

    def _validation_pass(self, name: str, buffer: Any) -> dict[str, float]:
        """Every loss on `validation_batches` held-out batches, logged under `name`,
        without gradients or training-state changes."""
        terms = [self.agent.validate(buffer.sample()) for _ in range(self.validation_batches)]
        mean = {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0].keys()}
        self.logger.scalars(name, mean, self.step)
        return {k: float(v) for k, v in mean.items()}

    @torch.no_grad()
    def _evaluate_in(self, env: Any) -> tuple[dict[str, float], list[TensorDict]]:
        """One episode per env with the deterministic planner (and the policy prior alone),
        logged to eval.csv; returns the results and the planner's episodes."""
        results: dict[str, float] = {}
        episodes: list[TensorDict] = []
        modes = [("reward", True)] + ([("reward_policy", False)] if self.eval_policy_prior else [])
        for name, use_planner in modes:
            returns, lengths, done = run_episodes(
                env, self.agent, use_planner,
                progress=f"eval ({'planner' if use_planner else 'policy prior'}, "
                         f"{env.spec.num_envs} episodes)" if self.progress else None)
            results[name] = float(np.mean(returns))
            if name == "reward":
                results["reward_std"] = float(np.std(returns))
                results["episode_length"] = float(np.mean(lengths))
                episodes = done
        self.logger.eval(self.step, results["reward"],
                         **{k: v for k, v in results.items() if k != "reward"})
        _log.info("eval at %s %d: %s", self.STEP_NAME, self.step,
                  ", ".join(f"{k}={v:.1f}" for k, v in results.items()))
        return results, episodes
