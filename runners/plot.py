"""Results of many runs: tables (mean ± std over seeds at chosen steps; the last evaluation
of every run) and learning curves (mean over seeds, shaded from the lowest to the highest).

    python -m runners.plot runs/grids/aux_heads [--steps=100k,500k,1M] [--plot_dir=DIR]
    python -m runners.grid --gin_file=gin/grids/aux_heads.gin --summarize   (the same)

Runs are found by their `eval.csv` (`step,reward,seed,...`); a run dir named `seed=<s>`
belongs to the condition named by its parent's path (`aux=on`), any other run dir is its
own condition. The task comes from the run's `run.json`. Published curves
(`<reference_dir>/<algorithm>/<task>.csv`, same columns) are drawn beside ours and listed
under the table; the reference dir defaults to `../shared/reference` next to the
repository (`$TDMPC2_REFERENCE_DIR` or `--reference_dir` override it) and is skipped when
missing.

The value of a run at step s is its latest evaluation at or before s (none once s is past
its last evaluation: the seed is left out, and the count in parentheses says how many seeds
are in); std is the sample standard deviation over seeds (0 for one seed). The second
table lists each run's last evaluation (its step and return), as a run is read while the
grid is still running and once it has finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlcore.config import REPO_ROOT

__all__ = ["Curve", "default_reference_dir", "format_last_table", "format_table",
           "load_reference", "main", "parse_steps", "plot_curves", "read_curve", "scan",
           "summarize", "summary_rows"]

REFERENCE_ENV = "TDMPC2_REFERENCE_DIR"


@dataclass
class Curve:
    """One seed's evaluation curve."""

    condition: str
    seed: int
    task: str
    steps: list[int]
    rewards: list[float]

    def at(self, step: int) -> float | None:
        """The latest evaluation at or before `step`; None before the first one and after
        the last one (a run that has not reached `step` has no value there)."""
        if not self.steps or step > self.steps[-1]:
            return None
        value = None
        for s, r in zip(self.steps, self.rewards):
            if s > step:
                break
            value = r
        return value

    def exactly(self, step: int) -> float | None:
        """The evaluation at `step` itself; None when the curve has none there."""
        for s, r in zip(self.steps, self.rewards):
            if s == step:
                return r
        return None


def default_reference_dir() -> Path:
    env = os.environ.get(REFERENCE_ENV)
    return Path(env) if env else REPO_ROOT.parent / "shared" / "reference"


def parse_steps(text: str) -> list[int]:
    """'100k,500k,1M' or '2000,4000' -> [100000, 500000, 1000000]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", part.replace("_", ""))
        if not m:
            raise ValueError(f"bad step {part!r}: use integers, optionally with k or M "
                             "(e.g. --steps=100k,1M)")
        scale = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
        out.append(int(float(m.group(1)) * scale))
    return sorted(set(out))


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _task_of(run_dir: Path) -> str:
    spec = {}
    try:
        spec = json.loads((run_dir / "run.json").read_text()).get("spec", {})
    except (OSError, ValueError):
        pass
    if spec.get("task"):
        return str(spec["task"])
    try:
        m = re.search(r"^TASK\s*=\s*['\"]([^'\"]+)['\"]", (run_dir / "config.gin").read_text(),
                      re.MULTILINE)
        if m:
            return m.group(1)
    except OSError:
        pass
    return "unknown"


def read_curve(run_dir: Path, condition: str, seed: int | None = None,
               task: str | None = None) -> Curve | None:
    """A run's curve from its eval.csv (None when it has no evaluation yet)."""
    path = Path(run_dir) / "eval.csv"
    if not path.exists():
        return None
    rows = [r for r in _read_rows(path) if r.get("step") and r.get("reward")]
    if not rows:
        return None
    rows.sort(key=lambda r: int(float(r["step"])))
    if seed is None:
        seed = int(float(rows[0].get("seed") or 0))
    task = task or _task_of(Path(run_dir))
    # a grid's task axis names the task in the condition too ('task=cartpole-swingup,aux=on'):
    # drop that part, as runs are grouped by task anyway
    parts = [p for p in condition.split(",") if p.partition("=")[2] != task]
    condition = ",".join(parts) or condition
    return Curve(condition, seed, task,
                 [int(float(r["step"])) for r in rows], [float(r["reward"]) for r in rows])


def scan(root: Path) -> list[Curve]:
    """Every run under `root` (found by its eval.csv), grouped into conditions."""
    root = Path(root)
    curves = []
    for csv_path in sorted(root.rglob("eval.csv")):
        run_dir = csv_path.parent
        m = re.fullmatch(r"seed=(-?\d+)", run_dir.name)
        cond_dir = run_dir.parent if m else run_dir
        condition = str(cond_dir.relative_to(root)) if cond_dir != root else root.name
        curve = read_curve(run_dir, condition, int(m.group(1)) if m else None)
        if curve is not None:
            curves.append(curve)
    return curves


def load_reference(reference_dir: Path | None, tasks: Iterable[str]) -> dict[str, dict[str, list[Curve]]]:
    """{task: {algorithm: [one Curve per seed]}} for the tasks with published curves."""
    out: dict[str, dict[str, list[Curve]]] = {}
    if reference_dir is None or not Path(reference_dir).is_dir():
        return out
    for task in tasks:
        for algo_dir in sorted(p for p in Path(reference_dir).iterdir() if p.is_dir()):
            path = algo_dir / f"{task}.csv"
            if not path.exists():
                continue
            by_seed: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for r in _read_rows(path):
                try:
                    by_seed[int(float(r.get("seed") or 0))].append(
                        (int(float(r["step"])), float(r["reward"])))
                except (KeyError, ValueError):
                    continue
            curves = [Curve(algo_dir.name, seed, task, [s for s, _ in sorted(pts)],
                            [v for _, v in sorted(pts)]) for seed, pts in sorted(by_seed.items())]
            if curves:
                out.setdefault(task, {})[algo_dir.name] = curves
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _default_steps(curves: Sequence[Curve], count: int = 4) -> list[int]:
    steps = sorted({s for c in curves for s in c.steps})
    if len(steps) <= count:
        return steps
    picks = {steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)


@dataclass
class Row:
    task: str
    condition: str
    reference: bool
    cells: dict[int, tuple[float, float, int] | None]   # step -> (mean, std, n seeds)
    seeds: int


def summary_rows(curves: Sequence[Curve], steps: Sequence[int] | None = None,
                 reference: dict[str, dict[str, list[Curve]]] | None = None
                 ) -> tuple[dict[str, list[int]], list[Row]]:
    """Per task: the steps shown and one row per condition (then per published algorithm)."""
    by_task: dict[str, dict[str, list[Curve]]] = defaultdict(lambda: defaultdict(list))
    for c in curves:
        by_task[c.task][c.condition].append(c)
    task_steps, rows = {}, []
    for task in sorted(by_task):
        conds = by_task[task]
        shown = list(steps) if steps else _default_steps([c for cs in conds.values() for c in cs])
        task_steps[task] = shown
        groups = [(cond, False, cs) for cond, cs in sorted(conds.items())]
        groups += [(algo, True, cs) for algo, cs in sorted((reference or {}).get(task, {}).items())]
        for name, is_ref, cs in groups:
            cells = {}
            for s in shown:
                # published curves only where they were evaluated (every 100k): their
                # value at 0 is no figure for 25k
                vals = [v for v in ((c.exactly(s) if is_ref else c.at(s)) for c in cs)
                        if v is not None]
                cells[s] = (*_mean_std(vals), len(vals)) if vals else None
            rows.append(Row(task, name, is_ref, cells, len(cs)))
    return task_steps, rows


def _fmt_step(s: int) -> str:
    if s >= 1_000_000 and s % 100_000 == 0:
        return f"{s / 1_000_000:g}M"
    if s >= 10_000 and s % 1_000 == 0:
        return f"{s // 1_000}k"
    return str(s)


def format_table(task_steps: dict[str, list[int]], rows: Sequence[Row]) -> str:
    """Plain-text tables, one per task: eval reward, mean ± std (seeds) at each step."""
    out = []
    for task, shown in task_steps.items():
        task_rows = [r for r in rows if r.task == task]
        head = ["condition"] + [f"step {_fmt_step(s)}" for s in shown]
        body = []
        for r in task_rows:
            name = f"{r.condition} (published)" if r.reference else r.condition
            vals = []
            for s in shown:
                v = r.cells[s]
                vals.append("-" if v is None else f"{v[0]:.1f} ± {v[1]:.1f} ({v[2]})")
            body.append([name] + vals)
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

        def line(cols: list[str], widths: list[int] = widths) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cols, widths)))

        out.append(f"{task}: eval reward, mean ± std over seeds (number of seeds)")
        out.append(line(head))
        out.append("  ".join("-" * w for w in widths))
        ours = [b for b, r in zip(body, task_rows) if not r.reference]
        refs = [b for b, r in zip(body, task_rows) if r.reference]
        out += [line(b) for b in ours]
        if refs:
            out.append("  ".join("·" * w for w in widths))
            out += [line(b) for b in refs]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def format_last_table(curves: Sequence[Curve]) -> str:
    """One line per run: its task, condition, seed, last evaluated env step and return."""
    rows = [[c.task, c.condition, str(c.seed), str(c.steps[-1]), f"{c.rewards[-1]:.1f}"]
            for c in sorted(curves, key=lambda c: (c.task, c.condition, c.seed))]
    head = ["task", "condition", "seed", "env step", "reward"]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]

    def line(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cols, widths)))

    out = ["last evaluation of each run (eval reward at its latest env step)", line(head),
           "  ".join("-" * w for w in widths), *[line(r) for r in rows]]
    return "\n".join(out) + "\n"


def _band(curves: Sequence[Curve], max_step: int | None):
    """Mean, min and max over seeds at each eval step, up to the first step past `max_step`
    (so a line reaches the plot's edge; the axis clips it)."""
    steps = sorted({s for c in curves for s in c.steps})
    if max_step is not None:
        past = [s for s in steps if s > max_step]
        steps = [s for s in steps if s <= max_step] + past[:1]
    means, lows, highs = [], [], []
    for s in steps:
        # a seed contributes where it evaluated at s (curves share eval steps in practice)
        vals = [r for c in curves for cs, r in zip(c.steps, c.rewards) if cs == s]
        means.append(_mean_std(vals)[0])
        lows.append(min(vals))
        highs.append(max(vals))
    return steps, means, lows, highs


def plot_curves(curves: Sequence[Curve], out_dir: Path,
                reference: dict[str, dict[str, list[Curve]]] | None = None,
                max_step: int | None = None) -> list[Path]:
    """One PNG per task: our conditions (solid) and the published curves (dashed), each the
    mean over seeds shaded from the lowest to the highest seed, over env steps up to
    `max_step` (None: our longest run, so short runs are not squeezed against the axis by
    the published curves' millions of steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, dict[str, list[Curve]]] = defaultdict(lambda: defaultdict(list))
    for c in curves:
        by_task[c.task][c.condition].append(c)
    paths = []
    for task, conds in sorted(by_task.items()):
        right = max_step if max_step is not None else max(
            c.steps[-1] for cs in conds.values() for c in cs)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups = [(cond, cs, "-") for cond, cs in sorted(conds.items())]
        groups += [(f"{algo} (published)", cs, "--")
                   for algo, cs in sorted((reference or {}).get(task, {}).items())]
        for label, cs, style in groups:
            steps, means, lows, highs = _band(cs, right)
            if not steps:
                continue
            n = len({c.seed for c in cs})
            shown = sum(s <= right for s in steps)
            (line,) = ax.plot(steps, means, style, marker="o" if shown <= 20 else None,
                              markersize=3, label=f"{label} ({n} seed{'s' * (n > 1)})")
            ax.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.15,
                            linewidth=0)
        ax.set_xlim(0, right * 1.02 if right > 0 else None)
        ax.set_title(f"{task}: mean over seeds, shaded min to max")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("eval episode return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(curves: Sequence[Curve], *, steps: Sequence[int] | None = None,
              reference_dir: Path | None = None, plot_dir: Path | None = None,
              max_step: int | None = None, out=print) -> list[Path]:
    """Print the table; draw the plots into `plot_dir` (if given); return the PNG paths."""
    if not curves:
        out("no results yet (no eval.csv with rows)")
        return []
    tasks = sorted({c.task for c in curves})
    reference = load_reference(reference_dir, tasks)
    if reference_dir is None or not Path(reference_dir).is_dir():
        out(f"(no published curves: reference dir {reference_dir} not found)")
    task_steps, rows = summary_rows(curves, steps, reference)
    out(format_table(task_steps, rows))
    out(format_last_table(curves))
    if plot_dir is None:
        return []
    paths = plot_curves(curves, plot_dir, reference, max_step)
    for p in paths:
        out(f"plot: {p}")
    return paths


def add_summary_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", default=None,
                   help="env steps for the table, e.g. 100k,500k,1M (default: up to 4 of the "
                   "evaluation steps)")
    p.add_argument("--reference_dir", default=None,
                   help=f"published curves (default: ${REFERENCE_ENV} or ../shared/reference)")
    p.add_argument("--plot_dir", default=None, help="where the PNGs go")
    p.add_argument("--max_step", default=None,
                   help="the plots' x range in env steps, e.g. 1M (default: our longest run)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="a directory of runs (e.g. runs/grids/aux_heads)")
    add_summary_flags(p)
    args = p.parse_args(argv)
    try:
        steps = parse_steps(args.steps) if args.steps else None
        max_step = parse_steps(args.max_step)[0] if args.max_step else None
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    root = Path(args.root)
    if not root.is_dir():
        sys.stderr.write(f"error: {root} is not a directory\n")
        return 2
    summarize(scan(root), steps=steps,
              reference_dir=Path(args.reference_dir) if args.reference_dir else default_reference_dir(),
              plot_dir=Path(args.plot_dir) if args.plot_dir else root / "plots", max_step=max_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
