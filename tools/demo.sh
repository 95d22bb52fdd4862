#!/usr/bin/env bash
# Everything on CPU: tokenizer + shards from this Python's standard library, two downstream tasks from its held-out
# split, train gpt_tiny until the validation loss has clearly fallen (scoring the tasks at each evaluation),
# checkpoint, print the loss curve, the scores and a generated sample, then export to Hugging Face and generate the
# same prompt through transformers. Re-running reuses what is built (data, checkpoints).
# Extra arguments are --set overrides, e.g. tools/demo.sh train.steps=100
set -euo pipefail
for arg in "$@"; do
    case "$arg" in
        -h | --help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $arg: the demo takes only section.key=value overrides (see --help)" >&2
            exit 2 ;;
        *=*) ;;
        *) echo "error: $arg is not a section.key=value override (see --help)" >&2; exit 2 ;;
    esac
done
. "$(dirname "$0")/env.sh" hf
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
DATA="${DATA:-data/builtin}"
RUN_DIR="${RUN_DIR:-runs/gpt_tiny}"
if [ ! -f "$DATA/manifest.json" ]; then
    python tools/prepare_data.py --input builtin --output "$DATA" --vocab-size 4096 --shard-tokens 2000000
else
    echo "reusing $DATA"
fi
if [ ! -f "$DATA/tasks/next_line.jsonl" ]; then
    python tools/make_tasks.py --data "$DATA" --out "$DATA/tasks"
fi
python -m pretrain.train --config configs/gpt_tiny.toml --set "data.path=$DATA" "logging.run_dir=$RUN_DIR" \
    "eval.tasks=['$DATA/tasks/next_line.jsonl', '$DATA/tasks/last_word.jsonl']" "$@"
python -c "from pretrain.metrics import summarize; print(summarize('$RUN_DIR'))"
echo "--- sample (prompt: 'def ') ---"
python tools/sample.py --checkpoint "$RUN_DIR/checkpoints" --prompt "def " --tokens 120
echo "--- export to Hugging Face: $RUN_DIR/hf ---"
python tools/convert_checkpoint.py --to hf --input "$RUN_DIR/checkpoints" --output "$RUN_DIR/hf" --overwrite
echo "--- the same prompt through transformers (greedy) ---"
python - "$RUN_DIR/hf" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([tok.encode("def ", add_special_tokens=False)])
out = model.generate(ids, max_new_tokens=120, do_sample=False, eos_token_id=3, pad_token_id=0)
print(tok.decode(out[0].tolist()))
PY
