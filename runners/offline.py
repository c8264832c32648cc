"""Offline training: `python -m runners.offline --gin_file=gin/offline.gin --dataset=FILE.h5`.

A thin entry point: flags and gin here, the configurable pipeline in
runners.offline_pipeline. `--dataset PATH` (repeatable) appends PATH, made absolute, to
`OfflineRunner.datasets` (paths already listed are not added twice), so the run's
config.gin names every file it trained on. An existing --run_dir resumes from its newest
complete checkpoint; `python -m runners.offline --run_dir=RUN` alone resumes from
RUN/config.gin.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runners import common

DESCRIPTION = "Train a TD-MPC2-family agent offline from HDF5 episode datasets."
PARSER = {"root": "OfflineRunner", "prefix": "offline"}


def _add_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dataset", action="append", default=[], metavar="PATH",
                   help="HDF5 episode dataset (repeatable); appended to OfflineRunner.datasets")
    return p


def _add_datasets(paths: list[str]) -> None:
    import gin

    from runners.offline_pipeline import OfflineRunner  # noqa: F401 - registers the root

    try:
        current = [str(p) for p in gin.query_parameter("OfflineRunner.datasets")]
    except ValueError:  # not bound
        current = []
    known = {str(Path(p).resolve()) for p in current}
    for path in paths:
        resolved = str(Path(path).resolve())
        if resolved not in known:
            current.append(resolved)
            known.add(resolved)
    gin.bind_parameter("OfflineRunner.datasets", current)


def _run(args, datasets: list[str]) -> int:
    from runners.offline_pipeline import OfflineRunner

    if datasets:
        _add_datasets(datasets)
    return common.build_and_run(OfflineRunner, args.run_dir, "offline")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra, rest = _add_flags(argparse.ArgumentParser(add_help=False, allow_abbrev=False)
                             ).parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        _add_flags(common.make_parser(DESCRIPTION, **PARSER)).print_help()
        return 0
    return common.main(rest, DESCRIPTION, lambda args: _run(args, extra.dataset), **PARSER)


if __name__ == "__main__":
    sys.exit(main())
