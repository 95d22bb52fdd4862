#!/usr/bin/env python3
"""Items a second of downstream scoring on one checkpoint and one multiple-choice task, on this machine:

    python tools/bench_eval.py --checkpoint runs/gpt_tiny/checkpoints --task data/builtin/tasks/next_line.jsonl

- ``in-loop shared``: the in-loop scorer (``pretrain/downstream.py``) as the trainer runs it: a context scored once
  for its choices, several contexts a row;
- ``in-loop alone``: the same scorer with one request a row (what lm-eval's models do);
- ``lm-eval hf``: lm-evaluation-harness's own ``hf`` model on the checkpoint exported to a temporary folder, its
  defaults (the one-token-continuation logits cache on), the same batch size and requests.

Each is timed from the task's text to the scores (encoding included), after one untimed run; the accuracies of the
three must agree (they are printed). ``--json``: the numbers as one JSON object. lm-eval: ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.checkpoint import CheckpointError, load_model  # noqa: E402
from pretrain.data.tokenizer import TokenizerError  # noqa: E402
from pretrain.errors import DataError, UserError  # noqa: E402


def timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up: allocations, lazy imports
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def accuracy(task, lls: list[float]) -> float:
    at, right = 0, 0
    for item in task.items:
        scores = lls[at:at + len(item.choices)]
        at += len(item.choices)
        right += int(max(range(len(scores)), key=lambda j: (scores[j], -j)) == item.gold)
    return right / len(task.items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step directory or a checkpoint directory")
    parser.add_argument("--task", required=True, help="a multiple-choice task file (.jsonl)")
    parser.add_argument("--tokenizer", help="default: the run's (its data's)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows a forward, every scorer (default 8)")
    parser.add_argument("--items", type=int, default=0, help="the first N items (default all)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs, the best kept (default 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1 or args.repeat < 1 or args.items < 0:
            raise UserError("--batch-size and --repeat must be >= 1, --items >= 0")
        model, cfg = load_model(args.checkpoint)
        if cfg.model.arch != "gpt":
            raise CheckpointError(f"{args.checkpoint} holds a {cfg.model.arch} model; scoring needs a gpt")
        from pretrain.checkpoint.hf import export_hf, run_tokenizer
        from pretrain.downstream import Downstream, checkpoint_tokenizer, load_task

        tok = checkpoint_tokenizer(args.checkpoint, cfg, args.tokenizer)
        task = load_task(args.task)
        if task.kind != "choice":
            raise DataError(f"{args.task}: a multiple-choice task is what this benchmark times")
        if args.items:
            task.items = task.items[:args.items]
        tokenizer_file = run_tokenizer(cfg, args.tokenizer)
        if tokenizer_file is None:
            raise UserError("the lm-eval hf model needs the run's tokenizer file to export with (--tokenizer)")
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        print(f'error: lm-evaluation-harness is not installed ({exc.name}): pip install -e ".[eval]"', file=sys.stderr)
        return 2
    except (CheckpointError, TokenizerError, DataError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def in_loop(shared: bool):
        def run():
            downstream = Downstream([args.task], tok, cfg.model.vocab_size, cfg.model.seq_len, args.batch_size)
            downstream.tasks[0].items = task.items
            downstream.requests = [[r for r in downstream.requests[0] if r.item < len(task.items)]]
            return downstream.evaluate(model, torch.device("cpu"), shared=shared, select=True)[f"{task.name}_acc"]
        return run

    rows = {}
    for name, shared in (("in-loop shared", True), ("in-loop alone", False)):
        seconds, acc = timed(in_loop(shared), args.repeat)
        rows[name] = {"seconds": seconds, "items_per_s": len(task.items) / seconds, "acc": acc}
    pairs = [(item.context, choice) for item in task.items for choice in item.choices]
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        folder = export_hf(model, cfg.model, Path(tmp) / "hf", tokenizer_file)
        hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.batch_size)
        seconds, results = timed(lambda: hf.loglikelihood(instances, disable_tqdm=True), args.repeat)
    rows["lm-eval hf"] = {"seconds": seconds, "items_per_s": len(task.items) / seconds,
                          "acc": accuracy(task, [ll for ll, _ in results])}
    base = rows["lm-eval hf"]["items_per_s"]
    for row in rows.values():
        row["vs_lm_eval_hf"] = row["items_per_s"] / base
    if args.json:
        print(json.dumps({"items": len(task.items), "requests": len(pairs), "batch_size": args.batch_size,
                          "threads": torch.get_num_threads(), **rows}, indent=1))
        return 0
    print(f"{len(task.items)} items ({len(pairs)} requests) of {task.name}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {cfg.model.n_layers} layers × d_model {cfg.model.d_model}, "
          f"seq_len {cfg.model.seq_len}")
    print(f"{'scorer':16s} {'items/s':>9s} {'× lm-eval hf':>13s} {'acc':>7s}")
    for name, row in rows.items():
        print(f"{name:16s} {row['items_per_s']:9.1f} {row['vs_lm_eval_hf']:13.2f} {row['acc']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
