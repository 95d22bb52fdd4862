#!/bin/bash
# GPT 1B at 32k context (configs/gpt_1b_32k.toml: the sequence split over cp = 4 GPUs, all-to-all attention) on
# 2 nodes × 8 GPUs (dp 4 × cp 4); the layout is in the config.
#
#   sbatch slurm/gpt_1b_32k.sh                                  # from the repository root, environment activated
#   sbatch --nodes=4 slurm/gpt_1b_32k.sh                        # any #SBATCH line can be overridden on the command line
#   CONFIG=configs/other.toml EXTRA_ARGS="train.steps=1000" RUN_DIR=runs/x DATA=data/corpus sbatch slurm/gpt_1b_32k.sh
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=8 --export=ALL,PROCS_PER_NODE=4 slurm/gpt_1b_32k.sh  # CPU nodes
#
# Environment knobs and the stop/requeue protocol: slurm/common.sh. Logs: logs/<job name>-<job id>.out.
#SBATCH --job-name=gpt_1b_32k
#SBATCH --nodes=2
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
CONFIG=${CONFIG:-$ROOT/configs/gpt_1b_32k.toml}
[ -f "$ROOT/slurm/common.sh" ] || { echo "error: $ROOT/slurm/common.sh not found: submit from the repository root or set PRETRAIN_ROOT" >&2; exit 1; }
. "$ROOT/slurm/common.sh"
