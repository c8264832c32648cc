"""`MetricLogger`: TensorBoard scalars, `eval.csv`, a progress bar and a console line.

TensorBoard tags are namespaced as in CleanRL (`train/`, `eval/`, `loss/`, `plan/`,
`time/`, ...), events go to `run_dir/tb/`, and the operative gin config is logged as text.
`eval.csv` has the columns `step,reward,seed` of the reference CSVs plus any extra
evaluation metrics. A resumed run (`resume_step > 0`) purges TensorBoard points and drops
`eval.csv` rows written after the checkpoint it resumes from, so no step appears twice.

Logging happens at a cadence, so converting tensors to python numbers here is the one
allowed host-device synchronization point: all tensors of one `scalars` call are moved
to the host together.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["MetricLogger"]

_log = logging.getLogger("rlcore")

EVAL_CSV = "eval.csv"
TB_DIR = "tb"
_BASE_COLUMNS = ("step", "reward", "seed")


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings (e.g. a loss TensorDict with `stats/...`) into `a/b` names."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        name = "/".join(name) if isinstance(name, tuple) else str(name)
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) or (
            hasattr(value, "items") and not isinstance(value, torch.Tensor)
        ):
            flat.update(_flatten(value, f"{key}/"))
        else:
            flat[key] = value
    return flat


def _to_floats(values: dict[str, Any]) -> dict[str, float]:
    """Convert numbers and one-element tensors to floats, one host transfer per device."""
    out: dict[str, float] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append((name, value))
        else:
            out[name] = float(value)
    for items in by_device.values():
        stacked = torch.stack([t.detach().reshape(()).to(torch.float64) for _, t in items])
        for (name, _), number in zip(items, stacked.cpu().tolist()):
            out[name] = number
    return {name: out[name] for name in values}  # keep the caller's order


class MetricLogger:
    """Writes a run's metrics to TensorBoard, `eval.csv`, a tqdm bar and the console.

    Args:
        run_dir: the run directory; events go to `run_dir/tb/`, rows to `run_dir/eval.csv`.
        total_steps: env steps of the whole run (the progress bar's total), if known.
        seed: written in the `seed` column of `eval.csv`.
        use_tensorboard: write TensorBoard events (otherwise only CSV and console).
        console_every: seconds between console summary lines (logger `rlcore`, INFO).
        progress: show a tqdm progress bar over env steps (auto-disabled off a TTY).
        resume_step: env step of the checkpoint a resumed run starts from (0 = fresh run).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        total_steps: int | None = None,
        seed: int = 0,
        use_tensorboard: bool = True,
        console_every: float = 10.0,
        progress: bool = True,
        resume_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.seed = seed
        self.console_every = console_every
        self.resume_step = resume_step

        self._step = resume_step
        self._returns: deque[float] = deque(maxlen=10)
        self._last_eval: float | None = None
        self._closed = False
        self._warned_columns: set[str] = set()

        # TensorBoard. purge_step hides points a crashed run wrote after its checkpoint;
        # TensorBoard purges steps >= purge_step, and points *at* the checkpoint step were
        # logged before it was saved, so purge from resume_step + 1 (as eval.csv does). A
        # restart from 0 over earlier events (an attempt that crashed before its first
        # checkpoint) purges all of them.
        self._writer = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = self.run_dir / TB_DIR
            if resume_step > 0:
                purge_step: int | None = resume_step + 1
            else:
                purge_step = 0 if any(tb_dir.glob("events.out.tfevents.*")) else None
            self._writer = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step)

        # eval.csv: truncate to the resume step, then append.
        self._csv_path = self.run_dir / EVAL_CSV
        self._columns: list[str] | None = None
        if self._csv_path.exists():
            self._columns = self._truncate_csv(resume_step)
        self._csv_file = None

        # Progress bar and console timing.
        self._bar = tqdm(
            total=total_steps,
            initial=resume_step,
            unit="step",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None if progress else True,  # None: off when stderr is not a TTY
            smoothing=0,  # rate (and ETA) = steps since the phase began / its time
        )
        self.phase_name: str | None = None
        self._console_time = time.perf_counter()
        self._console_step = resume_step

    # ------------------------------------------------------------------
    # Scalars.
    # ------------------------------------------------------------------
    @property
    def writer(self):
        """The TensorBoard SummaryWriter (None without TensorBoard), for images and videos."""
        return self._writer

    def scalars(self, prefix: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log each metric as `prefix/name` at `step` (non-finite values included).

        Nested mappings (a loss TensorDict's `stats/...`) become `prefix/stats/...`.
        """
        if self._writer is None or not metrics:
            return
        for name, value in _to_floats(_flatten(metrics)).items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def episode(self, returns: float, length: int, step: int) -> None:
        """Record one finished training episode (`train/episode_return`, `.../episode_length`)."""
        value = float(returns.item()) if isinstance(returns, torch.Tensor) else float(returns)
        self._returns.append(value)
        self.scalars("train", {"episode_return": value, "episode_length": int(length)}, step)
        mean = sum(self._returns) / len(self._returns)
        self._bar.set_postfix(ret=f"{value:.1f}", avg=f"{mean:.1f}", refresh=False)

    # ------------------------------------------------------------------
    # Evaluation CSV.
    # ------------------------------------------------------------------
    def _truncate_csv(self, resume_step: int) -> list[str] | None:
        """Drop rows with step > resume_step (atomically); return the existing header."""
        with open(self._csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return None
        header, kept = rows[0], []
        for row in rows[1:]:
            if len(row) != len(header):
                continue  # a row cut short by a crash
            try:
                row_step = int(float(row[0]))
            except ValueError:
                continue
            if row_step <= resume_step:
                kept.append(row)
        if len(kept) != len(rows) - 1:
            tmp = self._csv_path.with_name(f".{EVAL_CSV}.tmp_{os.getpid()}")
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._csv_path)
        return header

    def eval(self, step: int, reward: float, **extra: Any) -> None:
        """Append a row `step,reward,seed,<extra...>` to `eval.csv` and log `eval/*`.

        The extra columns are the sorted names of the first call (or of an existing file);
        later keys outside them are logged to TensorBoard only, missing ones left empty.
        """
        values = _to_floats({"reward": reward, **extra})
        reward_value = values.pop("reward")
        self._last_eval = reward_value

        if self._csv_file is None:
            if self._columns is None:
                self._columns = [*_BASE_COLUMNS, *sorted(values)]
            fresh = not self._csv_path.exists() or self._csv_path.stat().st_size == 0
            self._csv_file = open(self._csv_path, "a", newline="")
            if fresh:
                csv.writer(self._csv_file).writerow(self._columns)
        unknown = set(values) - set(self._columns) - self._warned_columns
        if unknown:
            _log.warning(
                "eval.csv has no column for %s; logged to TensorBoard only", sorted(unknown)
            )
            self._warned_columns |= unknown
        row_values: dict[str, Any] = {"step": int(step), "reward": reward_value, "seed": self.seed}
        row_values.update(values)
        csv.writer(self._csv_file).writerow([row_values.get(c, "") for c in self._columns])
        self._csv_file.flush()

        self.scalars("eval", {"reward": reward_value, **values}, step)

    # ------------------------------------------------------------------
    # Config, progress, console.
    # ------------------------------------------------------------------
    def config(self, text: str) -> None:
        """Log the operative gin config as TensorBoard text (`config/operative`, step 0)."""
        if self._writer is None:
            return
        self._writer.add_text("config/operative", f"```\n{text}\n```", global_step=0)

    def phase(self, name: str) -> None:
        """Start a phase (`seeding`, `training`, ...): the bar shows its name, and its rate
        and ETA count from here, so a fast seeding phase does not promise an early end."""
        if name == self.phase_name:
            return
        self.phase_name = name
        bar = self._bar
        if not bar.disable:
            bar.set_description_str(name, refresh=False)
            bar.initial = bar.n
            bar.start_t = bar.last_print_t = bar._time()
            bar.last_print_n = bar.n
            bar.refresh()

    def advance(self, step: int) -> None:
        """Move the progress bar to env step `step`; emit a console line every `console_every` s."""
        if step > self._step:
            self._bar.update(step - self._step)
            self._step = step
        now = time.perf_counter()
        elapsed = now - self._console_time
        if elapsed >= self.console_every:
            steps_per_second = (step - self._console_step) / elapsed
            self._console(step, steps_per_second)
            self.scalars("time", {"steps_per_second": steps_per_second}, step)
            self._console_time, self._console_step = now, step

    def _console(self, step: int, steps_per_second: float) -> None:
        total = f"/{self.total_steps}" if self.total_steps else ""
        # "-" until the first episode / evaluation of this process (after a resume too).
        last_return = f"{self._returns[-1]:.1f}" if self._returns else "-"
        last_eval = f"{self._last_eval:.1f}" if self._last_eval is not None else "-"
        _log.info(
            "step %d%s | %.0f steps/s | return %s | eval %s",
            step,
            total,
            steps_per_second,
            last_return,
            last_eval,
        )

    # ------------------------------------------------------------------
    # Lifetime.
    # ------------------------------------------------------------------
    def flush(self) -> None:
        """Flush TensorBoard events and the CSV file."""
        if self._writer is not None:
            self._writer.flush()
        if self._csv_file is not None:
            self._csv_file.flush()

    def close(self) -> None:
        """Flush and close everything (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._csv_file is not None:
            self._csv_file.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
