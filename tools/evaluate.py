#!/usr/bin/env python3
"""Score a checkpoint on downstream task files (the in-loop scorer, pretrain/downstream.py), offline:

    python tools/evaluate.py --checkpoint runs/gpt_tiny/checkpoints --tasks tasks/hellaswag.jsonl tasks/lambada.jsonl
    python tools/evaluate.py --checkpoint runs/gpt_tiny/checkpoints/step-00000300 --tasks t.jsonl --json

Any saved layout loads (``load_model`` consolidates it); the tasks are encoded with the tokenizer the run was
trained with (its data's, or ``--tokenizer``, checked against the checkpoint's). Prints one row per task and
metric, or with ``--json`` {task: {metric: value}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.checkpoint import CheckpointError, load_model, resolve_checkpoint  # noqa: E402
from pretrain.data.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from pretrain.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step directory or a checkpoint directory")
    parser.add_argument("--tasks", nargs="+", required=True, help="task files (JSONL: see README, 'Downstream tasks')")
    parser.add_argument("--tokenizer", help="sentencepiece model or Hugging Face tokenizer.json (default: the one of "
                                            "the run's data)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences a forward (default 8)")
    parser.add_argument("--json", action="store_true", help="print {task: {metric: value}} as JSON")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
        model, cfg = load_model(args.checkpoint)
        if cfg.model.arch != "gpt":
            raise CheckpointError(f"{args.checkpoint} holds a {cfg.model.arch} model; scoring continuations needs a "
                                  "gpt")
        from pretrain.downstream import Downstream, run_tokenizer

        tok = Tokenizer.load(args.tokenizer) if args.tokenizer else run_tokenizer(cfg)
        trained_on = json.loads((resolve_checkpoint(args.checkpoint, say=lambda line: None) / "state.json")
                                .read_text()).get("tokenizer_hash")
        if trained_on and getattr(tok, "hash", None) != trained_on:
            raise TokenizerError(f"tokenizer {args.tokenizer or 'of ' + (cfg.data.path or 'the data')} "
                                 f"({str(getattr(tok, 'hash', '?'))[:12]}) is not the one {args.checkpoint} was "
                                 f"trained with ({trained_on[:12]})")
        downstream = Downstream(args.tasks, tok, cfg.model.vocab_size, cfg.model.seq_len, args.batch_size)
    except (CheckpointError, TokenizerError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        values = downstream.evaluate(model, torch.device("cpu"))
    by_task: dict[str, dict[str, float]] = {}
    for task in downstream.tasks:
        by_task[task.name] = {key[len(task.name) + 1:]: value for key, value in values.items()
                              if key.startswith(task.name + "_")}
    if args.json:
        print(json.dumps(by_task, indent=1))
        return 0
    print(f"{'task':24s} {'metric':10s} {'value':>8s}  items")
    for task in downstream.tasks:
        for metric, value in by_task[task.name].items():
            print(f"{task.name:24s} {metric:10s} {value:8.4f}  {len(task.items)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
