"""Online training: `python -m runners.online --gin_file=gin/tdmpc2_dog.gin [--run_dir=...]`.

A thin entry point: flags and gin here, the configurable pipeline in runners.pipelines.
An existing --run_dir resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import sys

from runners import common


def _run(args) -> int:
    from runners.pipelines import OnlineRunner

    return common.build_and_run(OnlineRunner, args.run_dir, "online")


def main(argv=None) -> int:
    return common.main(argv, "Train a TD-MPC2-family agent online.", _run)


if __name__ == "__main__":
    sys.exit(main())
