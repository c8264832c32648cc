#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, as root, without systemd (DESIGN.md §9).
#
#   tests/runners/slurm_up.sh DIR        start munged (if needed), slurmctld and slurmd with
#                                        state, spool, logs and slurm.conf in DIR; wait until
#                                        the node is idle; print `export SLURM_CONF=DIR/slurm.conf`
#   tests/runners/slurm_up.sh --down DIR stop the slurmctld and slurmd started for DIR
#
# Needs slurmctld, slurmd, slurm-client and munge (.ci/setup_distributed.sh installs them).
# No accounting (slurmdbd): enough for submitit's successful jobs, arrays and requeue;
# runners.grid watches squeue itself for jobs that end without a result.
set -euo pipefail

stop() {
    local dir=$1
    for d in slurmd slurmctld; do
        if [ -f "$dir/$d.pid" ]; then
            local pid; pid=$(cat "$dir/$d.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do   # exited daemons linger as zombies here: read the state
                local st; st=$(ps -o stat= -p "$pid" 2>/dev/null || true)
                [ -z "$st" ] || [[ "$st" == Z* ]] && break
                sleep 0.1
            done
            rm -f "$dir/$d.pid"
        fi
    done
}

if [ "${1:-}" = "--down" ]; then
    stop "$2"
    exit 0
fi

DIR=$(realpath -m "${1:?usage: slurm_up.sh DIR | --down DIR}")
for bin in slurmctld slurmd sinfo munged; do
    command -v "$bin" >/dev/null || { echo "slurm_up: $bin not installed (run .ci/setup_distributed.sh)" >&2; exit 3; }
done
if [ "$(id -u)" != 0 ]; then echo "slurm_up: needs root (slurmd runs jobs as their users)" >&2; exit 3; fi

# munge: one daemon per machine; reuse a running one.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { echo "slurm_up: munged did not start" >&2; exit 1; }
fi

mkdir -p "$DIR/state" "$DIR/spool"
HOST=$(hostname -s)
NODE=$(slurmd -C | head -1 | sed -E "s/^NodeName=[^ ]+/NodeName=$HOST/")
cat > "$DIR/slurm.conf" <<CONF
ClusterName=grid-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=300
KillWait=5
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$DIR/slurm.conf"
stop "$DIR"
slurmctld -i
slurmd
for _ in $(seq 100); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.2
done
if [ "${state:-}" != idle ]; then
    echo "slurm_up: node not idle (state '${state:-none}'); logs in $DIR" >&2
    tail -5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF"
