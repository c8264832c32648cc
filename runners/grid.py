"""Ablation grids: `python -m runners.grid --gin_file=gin/grids/aux_heads.gin [flags]`.

Expands the grid into cells (one `python -m runners.online` run each), validates every
cell's gin config, prints the plan and runs the unfinished cells on an executor:

    --executor=local|slurm|ray   (default: the grid's `grid.executor`, else local)
    --max_workers, --threads_per_job          cells at once, CPU threads per cell
    --slurm_partition, --slurm_folder         Slurm (submitit job arrays)
    --ray_address                             Ray (none: a local cluster on 127.0.0.1)
    --dry_run                                 print the plan only
    --summarize [--steps=100k,1M] [--reference_dir] [--plot_dir] [--max_step]
                                              table + learning curves of the grid's cells

`--gin_param` bindings of `grid`/`*Executor` configure the grid; any other binding is
added to every cell (after `grid.params`). Exit code: 0 when every cell finished, 1 when
some cell failed or did not run (each failure is printed with its log path), 2 on user
errors (one line), 130 when interrupted (re-run the same command to finish).

A thin entry point: the grid lives in runners.grid_spec, running it in runners.grid_run
(executors: runners.grid_local, grid_slurm, grid_ray), the summary in runners.plot.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rlcore.config import ConfigError
from runners import grid_run, plot
from runners.grid_spec import Cell, Grid, GridError


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run an ablation grid of online runs.")
    p.add_argument("--gin_file", action="append", default=[],
                   help="grid file (repeatable; later files override earlier ones)")
    p.add_argument("--gin_param", "--gin_bindings", dest="gin_param", action="append",
                   default=[], help="a binding: grid.*/executor ones configure the grid, any "
                   "other goes to every cell (repeatable)")
    p.add_argument("--executor", choices=sorted(grid_run.EXECUTORS), default=None,
                   help="where cells run (default: grid.executor, else local)")
    p.add_argument("--max_workers", type=int, default=None, help="cells running at once")
    p.add_argument("--threads_per_job", type=int, default=None, help="CPU threads per cell")
    p.add_argument("--slurm_partition", default=None, help="Slurm partition")
    p.add_argument("--slurm_folder", default=None, help="submitit's job folder")
    p.add_argument("--ray_address", default=None,
                   help="Ray cluster address (host:port, ray://host:port or auto)")
    p.add_argument("--dry_run", action="store_true", help="print the plan only")
    p.add_argument("--summarize", action="store_true",
                   help="print the results table and draw learning curves; run nothing")
    plot.add_summary_flags(p)
    return p


def _summarize(grid: Grid, cells: Sequence[Cell], args) -> int:
    try:
        steps = plot.parse_steps(args.steps) if args.steps else None
        max_step = plot.parse_steps(args.max_step)[0] if args.max_step else None
    except ValueError as e:
        raise GridError(str(e)) from None
    found = [(cell, plot.read_curve(cell.run_dir, cell.condition or grid.name, cell.seed))
             for cell in cells]
    curves = [c for _, c in found if c is not None]
    missing = [cell.name for cell, c in found if c is None]
    print(f"grid {grid.name}: {len(curves)}/{len(cells)} cells have results ({grid.directory})")
    if missing:
        print(f"  without results yet: {', '.join(missing)}")
    ref = Path(args.reference_dir) if args.reference_dir else plot.default_reference_dir()
    plot.summarize(curves, steps=steps, reference_dir=ref, max_step=max_step,
                   plot_dir=Path(args.plot_dir) if args.plot_dir else grid.directory / "plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        grid, cell_params = grid_run.load_grid(args.gin_file, args.gin_param)
        cells = grid.cells(cell_params)
        if args.summarize:
            return _summarize(grid, cells, args)
        executor = grid_run.make_executor(
            grid, args.executor, max_workers=args.max_workers,
            threads_per_job=args.threads_per_job, partition=args.slurm_partition,
            folder=args.slurm_folder, address=args.ray_address)
        planned = grid.validate(cells)
        if not args.dry_run:
            executor.check()
        print(grid_run.format_plan(grid, planned, executor), flush=True)
        if args.dry_run:
            return 0
        with grid_run.sigterm_as_interrupt():
            outcome = grid_run.run_grid(grid, planned, executor,
                                        out=lambda s: print(s, flush=True))
        return 0 if outcome.ok else 1
    except (ConfigError, GridError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished cells are kept and started ones resume from "
                         "their checkpoints; re-run the same command to finish the grid\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
