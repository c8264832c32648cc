"""Export an online run's replay buffer: `python -m runners.export --run_dir=RUN --out=FILE.h5`.

Works on finished and interrupted runs alike: the replay buffer is rebuilt from the run's
`config.gin` (its `OnlineRunner.env` gives the EnvSpec, its `OnlineRunner.replay` the
buffer), filled from the newest complete checkpoint (or `--checkpoint`), and written to an
HDF5 episode dataset (format: components/replay/hdf5.py). The checkpoint is memory-mapped,
so only the rebuilt buffer is held in memory. The output file is written atomically and
never replaces an existing file unless `--overwrite` is given; the run directory is only
read.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runners import common

DESCRIPTION = "Export an online run's replay buffer to an HDF5 episode dataset."

_log = logging.getLogger("runners")


def _add_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default=None, metavar="FILE.h5", help="the HDF5 file to write")
    p.add_argument("--checkpoint", default=None, metavar="STEP_DIR",
                   help="a checkpoints/step_<n> folder (default: the newest complete one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--compression", default=None, choices=["gzip"],
                   help="compress the row datasets (default: none)")
    return p


def _run(args, extra) -> int:
    import gin
    import torch

    from components.replay.hdf5 import DatasetError, export_replay
    from rlcore.checkpointing import STATE_FILE, CheckpointError, Checkpointer
    from rlcore.seeding import seed_everything

    run_dir = Path(args.run_dir)
    out = Path(extra.out)
    if out.exists() and not extra.overwrite:
        raise common.RunError(f"{out} already exists; refusing to overwrite it. Choose another "
                              "--out, or pass --overwrite to replace it")

    # The checkpoint (verified against its sentinel) before anything is built.
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        folder = checkpointer.verify(extra.checkpoint)
    except CheckpointError as e:
        raise common.RunError(str(e)) from None

    # The env (for the spec) and the replay buffer, from the run's own config.
    try:
        bindings = gin.get_bindings("OnlineRunner")
    except (ValueError, KeyError) as e:
        raise common.ConfigError(f"{run_dir / common.CONFIG_FILE} has no OnlineRunner bindings "
                                 f"({e}); export works on online runs") from None
    missing = [k for k in ("env", "replay") if k not in bindings]
    if missing:
        raise common.ConfigError(f"{run_dir / common.CONFIG_FILE} binds no OnlineRunner."
                                 f"{' / OnlineRunner.'.join(missing)}; export works on online "
                                 "runs")
    seed = bindings.get("seed", 1)
    seed_everything(seed)
    try:
        env = bindings["env"](num_envs=1, seed=seed)
        spec = env.spec
        env.close()
        replay = bindings["replay"](spec, seed=seed, device="cpu")
    except (ValueError, TypeError) as e:
        raise common.ConfigError(f"could not rebuild the run's env and replay buffer: {e}") \
            from None

    try:  # mmap: the agent's tensors in the same file are never read
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise common.RunError(f"cannot read the checkpoint {folder}: {e}") from None
    if "replay" not in state:
        raise common.RunError(f"the checkpoint {folder} holds no replay state")
    try:
        replay.load_state_dict(state["replay"])
    except (KeyError, ValueError) as e:
        raise common.RunError(f"the replay state in {folder} does not fit the buffer built from "
                              f"{run_dir / common.CONFIG_FILE}: {e}") from None
    counters = state.get("counters", {})
    meta = {"source": str(run_dir.resolve()), "checkpoint": folder.name,
            "source_env_step": counters.get("env_step"),
            "source_updates": state.get("agent", {}).get("num_updates"), "seed": seed}
    del state

    try:
        info = export_replay(replay, spec, out, overwrite=extra.overwrite,
                             compression=extra.compression, **meta)
    except DatasetError as e:
        raise common.RunError(str(e)) from None
    _log.info("exported %d episodes (%d transitions, %d env steps, task %r) from %s to %s",
              info.num_episodes, info.num_transitions, info.env_steps, info.task, folder, out)
    return 0


PARSER = {"run_dir_help": "the online run whose replay buffer is exported (read only: its "
                          "config.gin and newest complete checkpoint, or --checkpoint)",
          "gin_flags": False}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra, rest = _add_flags(argparse.ArgumentParser(add_help=False, allow_abbrev=False)
                             ).parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        _add_flags(common.make_parser(DESCRIPTION, **PARSER)).print_help()
        return 0
    common_args, _ = common.make_parser(DESCRIPTION, **PARSER).parse_known_args(rest)
    problem = None
    if common_args.gin_file or common_args.gin_param:
        problem = ("export rebuilds the run from RUN/config.gin; pass no --gin_file or "
                   "--gin_param")
    elif not common_args.run_dir:
        problem = "pass --run_dir=RUN (an online run directory)"
    elif not (Path(common_args.run_dir) / common.CONFIG_FILE).is_file():
        problem = (f"{common_args.run_dir} is not a run directory (no {common.CONFIG_FILE}); "
                   "pass the --run_dir of an online run")
    elif not extra.out:
        problem = "pass --out=FILE.h5, the dataset to write"
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        return 2
    return common.main(rest, DESCRIPTION, lambda args: _run(args, extra), **PARSER)


if __name__ == "__main__":
    sys.exit(main())
