#!/usr/bin/env bash
# Everything we measure on a GPU, in one call that fits a short loan (default budget 480 s, one GPU), in this order:
#   0. the device facts (the compile gate is CPU work: CI and the dry run do it, never the loan)
#   1. the gpu-marked tests (bf16 / fp16 kernels on CUDA)
#   2. gpt_1b on this GPU, 30 steps of synthetic data, bf16: every Triton kernel + FusedAdamW, then torch kernels,
#      then torch kernels with FP8 (train.fp8 = tensorwise; tokens/s and MFU from the trainer's own metrics)
#   3. tools/bench_step.py at gpt_1b: our model against transformers' LlamaForCausalLM of the same config (SDPA,
#      fused AdamW, bf16 autocast, the logit check in bf16 too), interleaved in one process (Triton kernels;
#      torch kernels after step 4); then the step-cost meter's predicted gpt_1b step for both kernel sets (CPU,
#      ~1 min) — the report puts it beside the measured step of 2.
#   4. FP8 against bf16 at gpt_7b's shapes with 4 layers (what fits one GPU beside its optimizer), 20 steps each
#   5. tools/bench_kernels.py --op all (CSV + PNG, TFLOP/s or GB/s with % of the measured roofline, and the
#      autotune picks in kernels/autotune_picks.json)
#      then the attention on rows packed with documents of 512 / 2048 tokens at 8k / 32k (document masking: useful
#      TFLOP/s and time beside full causal, in kernels-docs/)
#   6. gpt_1b with Triton kernels and torch.compile, if the budget still allows
# and writes OUT/gpu_report.md (tools/gpu_report.py) beside the logs, CSVs and the device facts.
#
#   tools/gpu_check.sh --dry-run            # on CPU: print the plan, validate every config, the rules above, the
#                                           # meter and the report writer (the compile gate: CI, tools/compile_kernels.py)
#   tools/gpu_check.sh --out "$OUT"         # on the GPU (default out: runs/gpu_check)
#
# Wheels in .whl/ (tools/gpu_wheels.sh: torchao) are installed into a scratch prefix first.
# Environment: PYTHON (default python, else python3), GPU_CHECK_BUDGET_S (480). Each step has its own timeout,
# shortened to what is left of the budget, and is killed outright when it hits it (SIGKILL: exit 137 in the
# report; a SIGTERM would make a training run save a checkpoint first); once under 20 s are left the rest is
# skipped. Training runs keep their checkpoint directory outside OUT (GPU_CHECK_SCRATCH, default /tmp), removed
# after each step: nothing large ever lands in OUT. Every benchmark writes its rows as it goes.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=runs/gpu_check
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a directory}; shift ;;
        --out=*) OUT=${1#--out=} ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-$(command -v python || command -v python3)}
[ -n "$PY" ] || { echo "error: neither python nor python3 is on PATH (set PYTHON)" >&2; exit 2; }
SCRATCH=${GPU_CHECK_SCRATCH:-/tmp}/gpu_check_checkpoints
BUDGET=${GPU_CHECK_BUDGET_S:-480}
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "error: GPU_CHECK_BUDGET_S=$BUDGET is not a number of seconds" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi

TRAIN=(-m pretrain.train --config configs/gpt_1b.toml --set data.source=synthetic train.steps=30 train.grad_accum=4
       train.dtype=bf16 train.device=cuda eval.interval=0 checkpoint.interval=0 checkpoint.resume=never
       checkpoint.dir=$SCRATCH logging.interval=1 logging.tensorboard=false logging.heartbeat_s=0)
VARIANT_torch=(model.kernels=torch optim.impl=torch)
VARIANT_triton=(model.kernels=triton optim.impl=triton)
VARIANT_compiled=(model.kernels=triton optim.impl=triton train.compile=true)
GPT7B=(-m pretrain.train --config configs/gpt_7b.toml --set data.source=synthetic train.steps=20 train.grad_accum=1
       train.micro_batch_size=2 model.n_layers=4 train.dtype=bf16
       train.device=cuda eval.interval=0 checkpoint.interval=0 checkpoint.resume=never checkpoint.dir=$SCRATCH
       logging.interval=1 logging.tensorboard=false logging.heartbeat_s=0 train.fp8_keep_edge_blocks=0
       model.kernels=torch)
# DeepSeek-V3-class on a GPU for the first time: MLA (SDPA with v head dim ≠ qk), group-routed MoE, two MTP depths
DEEPSEEK=(-m pretrain.train --config configs/deepseek_tiny.toml --set data.source=synthetic train.steps=20
          model.mtp_depth=2 train.dtype=bf16 train.device=cuda model.kernels=triton eval.interval=0
          checkpoint.interval=0 checkpoint.resume=never checkpoint.dir=$SCRATCH logging.interval=1
          logging.tensorboard=false logging.heartbeat_s=0)
BENCH_STEP=(tools/bench_step.py --config configs/gpt_1b.toml --batch 2 --seq 4096 --dtype bf16 --steps 8 --warmup 2)
# the meter on the train_* runs' config (CPU only: the Triton ops run dry in the interpreter)
METER=(env TRITON_INTERPRET=1 $PY tools/step_cost.py --config configs/gpt_1b.toml --json --set train.grad_accum=4)

# name | timeout (s) | command
plan=(  # most wanted first: the goals' numbers, then the kernel table
    "facts|30|$PY tools/gpu_report.py --facts $OUT/facts.json"
    "gpu_tests|120|$PY -m pytest -p no:cacheprovider -q -m gpu tests/kernels tests/models/test_documents.py"
    "train_triton|120|$PY ${TRAIN[*]} ${VARIANT_triton[*]} logging.run_dir=$OUT/train-triton"
    "train_torch|120|$PY ${TRAIN[*]} ${VARIANT_torch[*]} logging.run_dir=$OUT/train-torch"
    "train_fp8|120|$PY ${TRAIN[*]} ${VARIANT_torch[*]} train.fp8=tensorwise logging.run_dir=$OUT/train-fp8"
    "hf_triton|90|$PY ${BENCH_STEP[*]} --set model.kernels=triton --json $OUT/hf-triton.json"
    "meter|120|${METER[*]} optim.impl=triton --kernels triton > $OUT/meter-triton.json && ${METER[*]} --kernels torch > $OUT/meter-torch.json"
    "gpt7b_bf16|90|$PY ${GPT7B[*]} logging.run_dir=$OUT/gpt7b-bf16"
    "gpt7b_fp8|90|$PY ${GPT7B[*]} train.fp8=tensorwise logging.run_dir=$OUT/gpt7b-fp8"
    "bench_kernels|150|$PY tools/bench_kernels.py --op all --dtype bf16 --out $OUT/kernels"
    "bench_docs|60|$PY tools/bench_kernels.py --op attention --dtype bf16 --seq 8192 32768 --doc-len 512 2048 --out $OUT/kernels-docs"
    "train_deepseek|60|$PY ${DEEPSEEK[*]} logging.run_dir=$OUT/train-deepseek"
    "hf_torch|90|$PY ${BENCH_STEP[*]} --set model.kernels=torch --json $OUT/hf-torch.json"
    "train_compiled|180|$PY ${TRAIN[*]} ${VARIANT_compiled[*]} logging.run_dir=$OUT/train-compiled"
)

if [ "$DRY" = 1 ]; then
    echo "plan (budget ${BUDGET} s; each limit is cut to what is left of it, steps are skipped once it is spent):"
    total=0
    for entry in "${plan[@]}"; do
        IFS='|' read -r name limit cmd <<< "$entry"
        total=$((total + limit))
        printf '  %-15s <= %4s s  %s\n' "$name" "$limit" "$cmd"
    done
    echo "  sum of step limits: ${total} s"
    fail=0
    scratch=$(mktemp -d)  # a dry run writes nothing under OUT
    trap 'rm -rf "$scratch"' EXIT
    check() {  # label, command...
        local label=$1; shift
        if out=$("$@" 2>&1); then echo "ok    $label: $(tail -n 1 <<< "$out")"
        else echo "FAIL  $label: $(tail -n 3 <<< "$out")"; fail=1; fi
    }
    # every step's config, as `python -m pretrain.train ARGS --check`, all in one process: "label|ARGS"
    configs=()
    for variant in torch triton compiled; do
        eval "extra=(\"\${VARIANT_$variant[@]}\")"
        configs+=("config train_$variant|${TRAIN[*]:2} ${extra[*]} train.device=auto logging.run_dir=$scratch/train-$variant")
    done
    configs+=("config train_fp8|${TRAIN[*]:2} ${VARIANT_torch[*]} train.fp8=tensorwise train.device=auto logging.run_dir=$scratch/train-fp8")
    for fp8 in none tensorwise; do
        configs+=("config gpt7b $fp8|${GPT7B[*]:2} train.fp8=$fp8 train.device=auto logging.run_dir=$scratch/7b")
    done
    configs+=("bench_step config|--config configs/gpt_1b.toml --set model.kernels=triton")
    configs+=("config train_deepseek|${DEEPSEEK[*]:2} train.device=auto logging.run_dir=$scratch/deepseek")
    "$PY" tools/gpu_report.py --check-configs "${configs[@]}" || fail=1
    check "gpu tests collected" bash -c "$PY -m pytest -p no:cacheprovider -q --collect-only -m gpu tests/kernels \
        | grep -E '^[0-9]+(/[0-9]+)? tests? (collected|selected)'"
    check "kernel ops" "$PY" -c "from pretrain.kernels.bench import OPS; print('ops:', ', '.join(OPS))"
    trains=()
    for entry in "${plan[@]}"; do
        IFS='|' read -r name limit cmd <<< "$entry"
        [[ "$cmd" == *"pretrain.train"* ]] && trains+=("${cmd#*-m pretrain.train }")
    done
    check "checkpoints outside OUT" "$PY" tools/gpu_report.py --checkpoints-outside "$OUT" "${trains[@]}"
    check "meter" "${METER[@]}" optim.impl=triton --kernels triton --tokens 16,32
    check "python" echo "$PY"
    check "report writer" "$PY" tools/gpu_report.py --self-test
    [ "$fail" = 0 ] && echo "dry run ok" || echo "dry run FAILED"
    exit "$fail"
fi

if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (no network there)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
    || { echo "error: no NVIDIA GPU here (nvidia-smi -L failed); on CPU use --dry-run" >&2; exit 2; }
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
for entry in "${plan[@]}"; do
    IFS='|' read -r name limit cmd <<< "$entry"
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped\t0\tbudget: %s s used of %s\n' "$name" "$SECONDS" "$BUDGET" >> "$OUT/steps.tsv"
        echo "== $name: skipped (budget spent)"
        continue
    fi
    [ "$limit" -le "$left" ] || limit=$left  # cut short; a training run reports the steps it logged
    echo "== $name (<= ${limit} s): $cmd"
    start=$SECONDS
    timeout --signal=KILL "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
    rc=$?
    rm -rf "$SCRATCH"  # a killed run's partial checkpoint, if any
    printf '%s\t%s\t%s\t\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
    echo "   exit $rc after $((SECONDS - start)) s; $(tail -n 1 "$OUT/$name.log")"
done
"$PY" tools/gpu_report.py "$OUT" && cat "$OUT/gpu_report.md"
