#!/bin/bash
# Moonlight-16B-A3B / DeepSeek-V2-Lite-shaped model (configs/deepseek_16b.toml: MLA, 64 experts top-6, 2.6B active of 16B) on
# 8 nodes × 8 GPUs: two interleaved pipeline stages, ZeRO-2 over 32 data-parallel ranks (the planner's pick; in the config).
#
#   sbatch slurm/deepseek_16b.sh                                  # from the repository root, environment activated
#   sbatch --nodes=16 slurm/deepseek_16b.sh                        # any #SBATCH line can be overridden on the command line
#   CONFIG=configs/other.toml EXTRA_ARGS="train.steps=1000" RUN_DIR=runs/x DATA=data/corpus sbatch slurm/deepseek_16b.sh
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=8 --export=ALL,PROCS_PER_NODE=4 slurm/deepseek_16b.sh  # CPU nodes
#
# Environment knobs and the stop/requeue protocol: slurm/common.sh. Logs: logs/<job name>-<job id>.out.
#SBATCH --job-name=deepseek_16b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@180
#SBATCH --output=logs/%x-%j.out

ROOT=${PRETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
CONFIG=${CONFIG:-$ROOT/configs/deepseek_16b.toml}
[ -f "$ROOT/slurm/common.sh" ] || { echo "error: $ROOT/slurm/common.sh not found: submit from the repository root or set PRETRAIN_ROOT" >&2; exit 1; }
. "$ROOT/slurm/common.sh"
