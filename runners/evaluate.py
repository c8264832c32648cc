"""Evaluate a trained run: `python -m runners.evaluate --run_dir=RUN [--episodes=10] [--videos=1]`.

A thin entry point: flags and gin here, `Evaluator` in runners.evaluation. The run's
`config.gin` alone rebuilds the env and the agent (or pass `--gin_file` with a
checkpoint's config); `--gin_param` bindings go on top (e.g. `Evaluator.video_fps = 15`,
or a smaller `MPPIPlanner.num_samples` to study the planner). Prints the JSON written to
`RUN/eval.json`. User errors (no checkpoint, no config.gin, a bad binding) end with one
message and exit code 2, before anything is written.

    python -m runners.evaluate --run_dir=runs/dog [--checkpoint=runs/dog/checkpoints/step_<n>]
        [--episodes=N] [--videos=K] [--video_size=256] [--no_policy_prior] [--seed=S]
        [--device=cpu] [--gin_file=...] [--gin_param=...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from runners import common
from runners.common import ConfigError, RunError


def _parser():
    p = common.make_parser("Evaluate a trained run: returns (JSON) and videos (mp4).")
    for action in p._actions:  # the shared flag reads "resume" for the training runners
        if action.dest == "run_dir":
            action.help = ("the run directory (its config.gin, checkpoints; eval.json and "
                           "videos/ are written there)")
        if action.dest == "gin_file":
            action.help = "gin file replacing RUN/config.gin (repeatable)"
    p.add_argument("--checkpoint", default=None,
                   help="a step_<n> checkpoint folder (default: the run's newest complete one)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per mode (default 10)")
    p.add_argument("--videos", type=int, default=None,
                   help="episodes recorded as mp4 videos (default 1; 0 disables)")
    p.add_argument("--video_size", type=int, default=None, help="video frame side (default 256)")
    p.add_argument("--no_policy_prior", action="store_true",
                   help="skip the evaluation of the policy prior alone")
    p.add_argument("--seed", type=int, default=None,
                   help="evaluation seed (default: the run's seed + 100000)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default auto)")
    return p


def _run_dir(args) -> Path:
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.checkpoint:
        path = Path(args.checkpoint)
        path = path.parent if path.is_file() else path
        if path.parent.name != "checkpoints":
            raise ConfigError(f"--checkpoint {args.checkpoint} is not inside "
                              "<run>/checkpoints/; pass --run_dir for the outputs")
        run_dir = path.parent.parent
    else:
        raise ConfigError("pass --run_dir=<run directory> (or --checkpoint=<run>/checkpoints/"
                          "step_<n>)")
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    return run_dir


def _evaluate(args) -> int:
    from rlcore.config import load_gin
    from runners.evaluation import Evaluator, find_checkpoint

    run_dir = _run_dir(args)
    find_checkpoint(run_dir, args.checkpoint)  # nothing to evaluate: fail before anything else
    files = list(args.gin_file) or [run_dir / common.CONFIG_FILE]
    if not args.gin_file and not files[0].exists():
        raise RunError(f"no {common.CONFIG_FILE} in {run_dir}: the run's config rebuilds the "
                       "agent. Pass --gin_file=<the run's config.gin>.")
    load_gin([str(f) for f in files], args.gin_param, finalize=False)
    flags = {"checkpoint": args.checkpoint, "episodes": args.episodes, "videos": args.videos,
             "video_size": args.video_size, "seed": args.seed, "device": args.device}
    kwargs = {k: v for k, v in flags.items() if v is not None}
    if args.no_policy_prior:
        kwargs["policy_prior"] = False
    try:
        evaluator = Evaluator(str(run_dir), **kwargs)
    except (ValueError, TypeError) as e:  # bad values reach components as they are built
        raise ConfigError(f"could not rebuild the run: {e}") from None
    result = evaluator.run()
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_process()
    args = _parser().parse_args(argv)
    if args.list_components:
        sys.stdout.write(common.list_components() + "\n")
        return 0
    try:
        return _evaluate(args)
    except (ConfigError, RunError) as e:
        message = str(e).split("\n  In call to configurable")[0]  # gin's call-site note
        sys.stderr.write(f"error: {message}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
