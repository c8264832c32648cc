#!/usr/bin/env bash
# Installs the distributed engines the grid tests use (DESIGN.md §9): a single-node Slurm
# from Debian's packages (slurmctld, slurmd, slurm-client, munge; no accounting) and, into
# the active Python environment, submitit and Ray. Idempotent: installed parts are skipped.
#
#   . .venv/bin/activate && .ci/setup_distributed.sh
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    if command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null
    else
        echo "setup_distributed: no apt-get; install slurmctld slurmd slurm-client munge" \
             "yourself (the slurm tests skip without them)" >&2
    fi
fi

PY="${PYTHON:-python}"
if ! "$PY" -c 'import submitit, ray' >/dev/null 2>&1; then
    "$PY" -m pip install -q 'submitit>=1.5' 'ray[tune]>=2.9'
fi
echo "setup_distributed: $(slurmctld -V 2>/dev/null || echo no slurm), "\
"$("$PY" -c 'import submitit, ray; print("submitit", submitit.__version__, "ray", ray.__version__)')"
