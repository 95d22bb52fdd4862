#!/usr/bin/env bash
# A real one-machine SLURM cluster with fake nodes (node1, node2, ...) for testing the batch scripts in slurm/.
#
#   tools/local_slurm.sh start            install (apt, as root) if needed, start munge + slurmctld + one slurmd
#                                         per node, wait until the nodes are idle
#   eval "$(tools/local_slurm.sh env)"    point sbatch / squeue / scontrol at it (sets SLURM_CONF)
#   tools/local_slurm.sh stop             cancel jobs, stop the daemons, kill whatever their jobs left behind
#
# Environment: LOCAL_SLURM_DIR (state, logs, config; default /tmp/pretrain-slurm), LOCAL_SLURM_NODES (2),
# LOCAL_SLURM_CPUS (CPUs each node claims; 8), LOCAL_SLURM_GPUS (fake GPUs each node offers as gres; 2),
# LOCAL_SLURM_PORT (slurmctld port; nodes use the ports after it).
#
# How it works: Debian's slurm has MULTIPLE_SLURMD, so several slurmd share 127.0.0.1 on different ports. The
# daemons run in a private mount namespace whose /etc/hosts also names node1..nodeN, so a job can use the node
# names as rendezvous addresses; job steps inherit that namespace. The fake GPUs are character devices cloned
# from /dev/null: SLURM allocates them (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE) and nothing can use them, so a
# job's processes train on the CPU. Everything is stopped by pid, never by name.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/pretrain-slurm}
NODES=${LOCAL_SLURM_NODES:-2}
CPUS=${LOCAL_SLURM_CPUS:-8}
GPUS=${LOCAL_SLURM_GPUS:-2}
PORT=${LOCAL_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf

die() { echo "local_slurm: $*" >&2; exit 1; }

have_slurm() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged && command -v mungekey; } >/dev/null

install_slurm() {
    have_slurm && return 0
    [ "$(id -u)" = 0 ] || die "slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get to install it"
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then  # keep the packages from starting system services
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    local pkgs=(slurmctld slurmd slurm-client munge) ok=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$DIR/apt.log" 2>&1 \
        || { apt-get update -q >>"$DIR/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
                >>"$DIR/apt.log" 2>&1; } && ok=1
    [ "$made_policy" = 1 ] && rm -f "$policy"
    [ "$ok" = 1 ] && have_slurm || die "apt-get could not install ${pkgs[*]} (log: $DIR/apt.log)"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local i
    {
        echo "# written by tools/local_slurm.sh"
        echo "ClusterName=pretrain-local"
        echo "SlurmctldHost=localhost"
        echo "SlurmctldPort=$PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # cred_expire: how long a requeued job waits before it may start again (SLURM default 120 s)
        echo "AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "JobCompType=jobcomp/none"
        echo "MpiDefault=none"
        echo "MailProg=/bin/true"
        echo "ReturnToService=2"
        echo "SlurmdParameters=config_overrides"
        echo "JobRequeue=1"
        echo "KillWait=10"
        echo "MinJobAge=600"
        echo "SchedulerParameters=sched_interval=2"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        [ "$GPUS" = 0 ] || echo "GresTypes=gpu"
        for i in $(seq 1 "$NODES"); do
            echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS" \
                "$([ "$GPUS" = 0 ] || echo "Gres=gpu:$GPUS") State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    : > "$DIR/gres.conf"
    for i in $(seq 1 "$NODES"); do
        [ "$GPUS" = 0 ] && break
        for g in $(seq 0 $((GPUS - 1))); do  # fake GPUs: /dev/null's device numbers
            [ -e "$DIR/dev/node$i-gpu$g" ] || mknod "$DIR/dev/node$i-gpu$g" c 1 3
        done
        echo "NodeName=node$i Name=gpu File=$DIR/dev/node$i-gpu[0-$((GPUS - 1))]" >> "$DIR/gres.conf"
    done
}

start() {
    mkdir -p "$DIR"
    install_slurm
    if alive "$DIR/run/slurmctld.pid"; then
        echo "local_slurm: already running ($CONF)"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root"
    mkdir -p "$DIR"/{munge,state,run,log,spool,dev}
    chmod 755 "$DIR" "$DIR/munge"
    if ! alive "$DIR/munge/munged.pid"; then
        [ -s "$DIR/munge/munge.key" ] || mungekey -c -k "$DIR/munge/munge.key" >/dev/null
        chmod 600 "$DIR/munge/munge.key"
        munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
            --log-file="$DIR/munge/munged.log" --pid-file="$DIR/munge/munged.pid" \
            --seed-file="$DIR/munge/munged.seed" || die "munged did not start (log: $DIR/munge/munged.log)"
    fi
    write_conf
    { cat /etc/hosts; echo "127.0.0.1 $(seq -f 'node%g' -s ' ' 1 "$NODES")"; } > "$DIR/hosts"
    local daemons="mount --bind '$DIR/hosts' /etc/hosts && slurmctld -f '$CONF'"
    for i in $(seq 1 "$NODES"); do daemons+=" && slurmd -f '$CONF' -N node$i"; done
    unshare --mount --propagation private bash -c "$daemons" \
        || die "the slurm daemons did not start (logs: $DIR/log)"
    readlink "/proc/$(cat "$DIR/run/slurmctld.pid")/ns/mnt" > "$DIR/run/mntns"
    local deadline=$((SECONDS + 60)) states
    while :; do
        states=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
        [ "$states" = "idle " ] && break
        [ $SECONDS -lt $deadline ] || die "nodes not idle after 60 s (states: ${states:-none}; logs: $DIR/log)"
        sleep 0.5
    done
    echo "local_slurm: $NODES nodes idle ($CONF)"
}

stop_pidfile() {  # TERM, then KILL after 10 s
    local pidfile=$1 pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop() {
    [ -d "$DIR/run" ] || { echo "local_slurm: not running"; return 0; }
    local ids pidfile ns proc pid
    if alive "$DIR/run/slurmctld.pid"; then
        ids=$(SLURM_CONF=$CONF squeue -h -o '%i' 2>/dev/null || true)
        [ -z "$ids" ] || SLURM_CONF=$CONF scancel $ids 2>/dev/null || true
        sleep 1
    fi
    for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do
        [ -e "$pidfile" ] && stop_pidfile "$pidfile"
    done
    if [ -s "$DIR/run/mntns" ]; then  # job steps outlive slurmd: kill what is left in the daemons' namespace
        ns=$(cat "$DIR/run/mntns")
        for proc in /proc/[0-9]*; do
            pid=${proc#/proc/}
            [ "$pid" != $$ ] && [ "$(readlink "$proc/ns/mnt" 2>/dev/null)" = "$ns" ] && kill -9 "$pid" 2>/dev/null || true
        done
        rm -f "$DIR/run/mntns"
    fi
    stop_pidfile "$DIR/munge/munged.pid"
    echo "local_slurm: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: tools/local_slurm.sh start|stop|env" >&2; exit 2 ;;
esac
