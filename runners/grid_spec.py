"""Ablation grids from gin overrides: expansion into cells, validation, cell status.

A grid file binds only the `grid` configurable (STYLE.md §7):

    grid.name = 'planner'
    grid.base_files = ['gin/tdmpc2_dog.gin']
    grid.axes = {
        'planner': ['gin/ablations/planner/mppi.gin', 'gin/ablations/planner/cem.gin'],
        'horizon': ['HORIZON = 3', 'HORIZON = 5'],
    }
    grid.seeds = [1, 2, 3]

An axis value is a fragment file (a path ending in `.gin`), a binding string or a list of
either; an axis can also be a dict `{label: value}` to name its values. Each cell is one
`python -m runners.online` run in `<root>/<name>/<axis>=<label>,.../seed=<s>`, with the
flags `--gin_file` (base files, then the axis files), `--gin_param` (axis bindings,
`grid.params`, the command line's cell bindings, `OnlineRunner.seed`, the thread cap) and
`--run_dir`.

Before anything runs, every cell's gin files and bindings are parsed exactly as the run
will parse them (nothing is built); an invalid cell is an error that names it. A cell is
*finished* when its run dir holds a complete checkpoint at `total_env_steps` or the `DONE`
marker written after it exited 0; finished cells are skipped. Any other cell runs with the
same command, and the runner resumes it from its newest checkpoint. Cells run from
runners.grid_run on an executor (runners.grid_local, grid_slurm, grid_ray).
"""

from __future__ import annotations

import dataclasses
import fcntl
import inspect
import itertools
import json
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
from rlcore.config import ConfigError, load_gin

LOG_FILE = "grid.log"
DONE_FILE = "DONE"
FAILED_FILE = "FAILED"
LOCK_FILE = ".grid.lock"
RUNNER_MODULE = "runners.online"
# Configurables bound by grid files; any other --gin_param of runners.grid goes to every cell.
GRID_CONFIGURABLES = ("grid", "LocalExecutor", "SlurmExecutor", "RayExecutor")


class GridError(RuntimeError):
    """A problem with a grid (its file, a cell, an executor) that the user must fix."""


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
        return shell_join(["python", *self.argv(threads)])


def shell_join(args: Sequence[str]) -> str:
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


# -- cell status: what the markers and checkpoints in a cell's run dir say ------------
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
                 executor: Any = None):
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
