#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the Slurm profile and for tests/test_slurm.py.
#
#   tools/local-slurm.sh start DIR   # write DIR/slurm.conf, start munged (if not running), slurmctld, slurmd
#   tools/local-slurm.sh stop DIR    # stop what `start DIR` started, by the process ids it recorded
#
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge (Slurm 22.05, munge 0.5).
# No accounting daemon: run Snakemake with --slurm-status-command squeue. Finished jobs stay visible to
# `squeue -t all` for an hour (MinJobAge), and each one's end is recorded in DIR/log/jobcomp.log.
# The config is linked to /etc/slurm/slurm.conf, the path compiled into Debian's Slurm: the `srun` that
# Snakemake's jobstep plugin runs inside each job drops SLURM_CONF.
# An /etc/slurm/slurm.conf that is not ours is never replaced; `start` stops with a message instead.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
etc_conf=/etc/slurm/slurm.conf

die() {
    echo "local-slurm: $*" >&2
    exit 1
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
node_idle() { [[ $(sinfo -h -N -o %T 2>/dev/null) == idle ]]; }

start() {
    [[ $(id -u) -eq 0 ]] || die "needs root (the daemons run as root and the config goes to $etc_conf)"
    for tool in munged munge unmunge slurmctld slurmd sbatch squeue sinfo; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y slurm-wlm munge"
    done
    mkdir -p "$dir"/{state,spool,log,run}

    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$dir/slurm.conf" <<EOF
# Written by tools/local-slurm.sh: one node, no accounting, no cgroups.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=3600
KillWait=5
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    mkdir -p /etc/slurm
    if [[ -e $etc_conf || -L $etc_conf ]]; then
        [[ -L $etc_conf && $(readlink "$etc_conf") == "$dir/slurm.conf" ]] ||
            die "$etc_conf exists and is not this cluster's; move it away first"
    else
        ln -s "$dir/slurm.conf" "$etc_conf"
    fi

    if ! munge_works; then
        [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        runuser -u munge -- munged
        wait_for 10 munge_works || die "munged did not come up"
        cp /run/munge/munged.pid "$dir/run/munged.pid" # ours: `stop` ends it
    fi

    pid_alive "$dir/run/slurmctld.pid" || slurmctld
    pid_alive "$dir/run/slurmd.pid" || slurmd
    if ! wait_for 30 node_idle; then
        tail -n 20 "$dir"/log/*.log >&2 || true
        die "the node did not become idle (logs above)"
    fi
    echo "local-slurm: up ($host, $cpus CPUs, $mem_mb MB; config $etc_conf -> $dir/slurm.conf)"
}

stop() {
    local name pidfile pid
    for name in slurmd slurmctld munged; do
        pidfile=$dir/run/$name.pid
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill "$pid" 2>/dev/null; then
            wait_for 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    if [[ -L $etc_conf && $(readlink "$etc_conf") == "$dir/slurm.conf" ]]; then
        rm -f "$etc_conf"
    fi
    echo "local-slurm: stopped"
}

case $action in
start) start ;;
stop) stop ;;
*) usage ;;
esac
