"""Online training: `python -m runners.online --gin_file=gin/tdmpc2_dog.gin [--run_dir=...]`.

A thin entry point: flags and gin here, the configurable pipeline in runners.pipelines.
An existing --run_dir resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from runners import common


def _run(args) -> int:
    from runners.pipelines import OnlineRunner

    run_dir = args.run_dir or str(Path("runs") / time.strftime("online-%Y%m%d-%H%M%S"))
    try:
        runner = OnlineRunner(run_dir)
    except (ValueError, TypeError) as e:  # bad values reach components as they are built
        raise common.ConfigError(f"could not build the run: {e}") from None
    runner.run()
    return 0


def main(argv=None) -> int:
    return common.main(argv, "Train a TD-MPC2-family agent online.", _run)


if __name__ == "__main__":
    sys.exit(main())
