# The body shared by the batch scripts in slurm/ (sourced after they set CONFIG and ROOT): fail-fast checks, the
# rendezvous, one torchrun per node through srun, and the stop-signal -> save -> requeue protocol.
#
# Environment (all optional; sbatch passes the submitting shell's environment by default):
#   CONFIG          TOML preset (each script has its own default)
#   EXTRA_ARGS      space-separated config overrides, e.g. "train.steps=1000 optim.lr=1e-4" (passed to --set)
#   RUN_DIR         the run's logging.run_dir (checkpoints, metrics); default runs/<config name>
#   DATA            data.path (a directory made by tools/prepare_data.py)
#   GPUS_PER_NODE   GPUs each node has; default: what SLURM allocated (--gpus-per-node); checked against it
#   PROCS_PER_NODE  training processes per node; default GPUS_PER_NODE; set it on CPU nodes
#   MAX_RESTARTS    torchrun restarts of all workers after a crash, each resuming from the latest checkpoint (3)
#   LAUNCHER        torchrun (default) | srun: one srun task per process, no torchrun (and no restarts)
#   PYTHON          the interpreter (default: python on PATH; activate your environment before sbatch)
#
# Stop protocol: SLURM sends SIGUSR1 to this script 180 s before the time limit (--signal=B:USR1@180). The trap
# forwards it to every process of the job step; each trainer finishes its step, all ranks save a checkpoint
# together and exit; this script then runs `scontrol requeue`, and the requeued job resumes from `latest`.
# SIGTERM (scancel, preemption by SLURM) reaches the trainers directly: they save if they can, and the job is
# not requeued by this script.

set -uo pipefail

fail() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date '+%F %T')] $*"; }

[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a SLURM job: submit with sbatch (sbatch slurm/$(basename "$0"))"
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-torchrun}
MAX_RESTARTS=${MAX_RESTARTS:-3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --- fail fast, before any node starts ----------------------------------------------------------------------
[ -f "$CONFIG" ] || fail "config file not found: $CONFIG"
command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH: activate the environment before sbatch"
"$PYTHON" -c "import torch, pretrain" 2>/dev/null \
    || fail "$(command -v "$PYTHON") cannot import torch and pretrain: activate the environment before sbatch"
case "$LAUNCHER" in torchrun | srun) ;; *) fail "LAUNCHER=$LAUNCHER is not one of torchrun, srun" ;; esac
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || fail "MAX_RESTARTS=$MAX_RESTARTS is not a number >= 0"

RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .toml)}
probe="$RUN_DIR/.write-test.$SLURM_JOB_ID"
{ mkdir -p "$RUN_DIR" && : > "$probe" && rm -f "$probe"; } 2>/dev/null || fail "run dir $RUN_DIR is not writable"

alloc_gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
alloc_gpus=${alloc_gpus##*:}  # "h100:8" -> 8
if [ -n "${GPUS_PER_NODE:-}" ] && [ -n "$alloc_gpus" ] && [ "$GPUS_PER_NODE" != "$alloc_gpus" ]; then
    fail "GPUS_PER_NODE=$GPUS_PER_NODE but the allocation has $alloc_gpus GPUs per node (sbatch --gpus-per-node)"
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-${alloc_gpus:-0}}
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || fail "GPUS_PER_NODE=$GPUS_PER_NODE is not a number"
PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
[[ "$PROCS_PER_NODE" =~ ^[0-9]+$ ]] || fail "PROCS_PER_NODE=$PROCS_PER_NODE is not a number"
[ "$PROCS_PER_NODE" -ge 1 ] \
    || fail "no GPUs in the allocation and no PROCS_PER_NODE: set PROCS_PER_NODE (processes per node) for CPU nodes"
if [ "$GPUS_PER_NODE" -gt 0 ] && [ "$PROCS_PER_NODE" -gt "$GPUS_PER_NODE" ]; then
    fail "PROCS_PER_NODE=$PROCS_PER_NODE is more than the $GPUS_PER_NODE GPUs per node"
fi

NNODES=$SLURM_JOB_NUM_NODES
WORLD=$((NNODES * PROCS_PER_NODE))
read -r -a extra <<< "${EXTRA_ARGS:-}"
overrides=("logging.run_dir=$RUN_DIR")
[ -n "${DATA:-}" ] && overrides+=("data.path=$DATA")
overrides+=("${extra[@]}")
train_args=(-m pretrain.train --config "$CONFIG" --set "${overrides[@]}")
# the config and the parallel layout for this many processes, one clear line if wrong
WORLD_SIZE=$WORLD "$PYTHON" "${train_args[@]}" --check || exit 1

# --- rendezvous and environment -----------------------------------------------------------------------------
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$((CPUS_PER_TASK / PROCS_PER_NODE))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
# NCCL (only what differs from the defaults; each may be set before sbatch instead):
# - NCCL_DEBUG=WARN: one line per real problem in the log; INFO dumps the topology and transports when debugging.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# - TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed or timed-out collective aborts the communicator and the process
#   exits, so torchrun restarts the workers instead of the job hanging until its time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# - CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue, so tensor-parallel collectives are issued in program order
#   and overlap with compute as scheduled.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# - TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: workers get a fresh store each rendezvous round instead of sharing
#   torchrun's; with the shared one, a restart after a crash can read the previous round's addresses and fail to
#   connect (pytorch/pytorch#135712), which defeats MAX_RESTARTS.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# - Not set here, set them for your fabric: NCCL_SOCKET_IFNAME (the bootstrap interface when the default picks
#   a wrong one, e.g. docker0), NCCL_IB_HCA (which InfiniBand adapters), NCCL_IB_TIMEOUT / NCCL_IB_RETRY_CNT
#   (a longer retransmit timeout on large or busy fabrics).

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes × $PROCS_PER_NODE processes, config" \
    "$CONFIG, run dir $RUN_DIR, launcher $LAUNCHER, rendezvous $HEAD:$PORT"

if [ "$LAUNCHER" = torchrun ]; then
    # torchrun ignores SIGUSR1 (the trap below forwards it to every process of the step); its workers install
    # their own handler. --kill-on-bad-exit: one node failing for good ends the step on all nodes.
    step=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK"
          bash -c 'trap "" USR1; exec "$@"' torchrun "$PYTHON" -m torch.distributed.run
          --nnodes="$NNODES" --nproc-per-node="$PROCS_PER_NODE" --rdzv-backend=c10d
          --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" --max-restarts="$MAX_RESTARTS"
          "${train_args[@]}")
else
    per_task=$((CPUS_PER_TASK / PROCS_PER_NODE))
    [ "$per_task" -ge 1 ] || per_task=1
    export MASTER_ADDR=$HEAD MASTER_PORT=$PORT
    step=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$WORLD" --ntasks-per-node="$PROCS_PER_NODE"
          --cpus-per-task="$per_task" "$PYTHON" "${train_args[@]}")
fi

stop_signal=""
on_signal() {
    stop_signal=$1
    if [ "$1" = USR1 ]; then
        log "got SIGUSR1: asking every rank to save and stop"
        scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
    else
        log "got SIG$1: the ranks got it too and save if they can; not requeueing"
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

"${step[@]}" &
step_pid=$!
while kill -0 "$step_pid" 2>/dev/null; do
    wait "$step_pid"  # returns early when a trapped signal arrives
done
wait "$step_pid"
rc=$?

# After a stop signal and a save, a trainer alone exits 75 and one of many exits 0 (see pretrain/train.py)
if [ "$rc" = 75 ] || { [ "$stop_signal" = USR1 ] && [ "$rc" = 0 ]; }; then
    log "checkpoint saved; requeueing job $SLURM_JOB_ID to resume from it"
    scontrol requeue "$SLURM_JOB_ID" || fail "scontrol requeue failed: resubmit with the same RUN_DIR to resume"
    exit 0
fi
[ "$rc" = 0 ] && log "training finished" || log "training failed: exit status $rc"
exit "$rc"
