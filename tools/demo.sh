#!/usr/bin/env bash
# Everything on CPU: tokenizer + shards from this Python's standard library, train gpt_tiny until the validation
# loss has clearly fallen, checkpoint, print the loss curve and a generated sample. Re-running reuses what is
# built (data, checkpoints). Extra arguments are --set overrides, e.g. tools/demo.sh train.steps=100
set -euo pipefail
. "$(dirname "$0")/env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
DATA="${DATA:-data/builtin}"
RUN_DIR="${RUN_DIR:-runs/gpt_tiny}"
if [ ! -f "$DATA/manifest.json" ]; then
    python tools/prepare_data.py --input builtin --output "$DATA" --vocab-size 4096 --shard-tokens 2000000
else
    echo "reusing $DATA"
fi
python -m pretrain.train --config configs/gpt_tiny.toml --set "data.path=$DATA" "logging.run_dir=$RUN_DIR" "$@"
python -c "from pretrain.metrics import summarize; print(summarize('$RUN_DIR'))"
echo "--- sample (prompt: 'def ') ---"
python tools/sample.py --checkpoint "$RUN_DIR/checkpoints" --prompt "def " --tokens 120
