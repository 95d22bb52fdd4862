#!/usr/bin/env python3
"""Score a checkpoint on downstream tasks — task files (JSONL) or lm-evaluation-harness tasks — with this project's
scorer or with lm-eval's ``hf`` model on an exported copy:

    python tools/evaluate.py --checkpoint runs/gpt_tiny/checkpoints --tasks tasks/next_line.jsonl tasks/last_word.jsonl
    python tools/evaluate.py --checkpoint runs/gpt_tiny/checkpoints/step-00000300 --tasks hellaswag arc_easy --json
    python tools/evaluate.py --checkpoint runs/gpt_tiny/checkpoints --tasks t.jsonl --backend hf

``--tasks``: a ``.jsonl`` file is a task in this project's format (README, "Downstream tasks"); anything else is an
lm-eval task or group name (``--include-path`` adds a folder of lm-eval task YAMLs). ``--backend native`` (default):
the checkpoint as saved, any layout (``load_model`` consolidates it) — JSONL files by the in-loop scorer
(``pretrain/downstream.py``), lm-eval tasks by lm-eval's ``pretrain`` model (``pretrain/lm_eval_model.py``);
``--backend hf``: the checkpoint exported to a temporary Hugging Face folder and scored by lm-eval's own ``hf`` model,
JSONL files through the lm-eval task YAML ``tools/make_tasks.py`` writes beside them (made here when missing).
The tokenizer is the run's (its data's, or ``--tokenizer``, checked against the checkpoint's). Prints one row per
task and metric, or with ``--json`` {task: {metric: value}} (``acc``, ``acc_norm``, ``ppl``, ...). lm-eval:
``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.checkpoint import CheckpointError, load_model  # noqa: E402
from pretrain.data.tokenizer import TokenizerError  # noqa: E402
from pretrain.errors import DataError, UserError  # noqa: E402


def lm_eval_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's ``results``: the ``none`` filter's values, ``perplexity`` as ``ppl``."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            row["ppl" if metric == "perplexity" else metric] = float(value)
        if row:
            out[task] = row
    return out


def run_lm_eval(model, names: list[str], include: list[str], batch_size: int, limit: int | None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``model`` (an LM) on ``names``, zero-shot: {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include:  # the folders alone first: indexing lm-eval's thousands of own tasks takes seconds
        local = TaskManager(include_path=include, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            manager = local
    manager = manager or TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: {', '.join(unknown)}: neither a .jsonl file nor a task lm-eval knows "
                        "(--include-path adds a folder of task YAMLs)")
    results = simple_evaluate(model=model, tasks=names, task_manager=manager, batch_size=batch_size, limit=limit,
                              log_samples=False, bootstrap_iters=0)
    return lm_eval_metrics(results["results"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step directory or a checkpoint directory")
    parser.add_argument("--tasks", nargs="+", required=True,
                        help="task files (.jsonl: see README, 'Downstream tasks') or lm-eval task names")
    parser.add_argument("--backend", choices=["native", "hf"], default="native",
                        help="native: the checkpoint as saved (default); hf: lm-eval's hf model on an export")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a folder of lm-eval task YAMLs (repeatable)")
    parser.add_argument("--tokenizer", help="sentencepiece model or Hugging Face tokenizer.json (default: the one of "
                                            "the run's data)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences a forward (default 8)")
    parser.add_argument("--limit", type=int, help="lm-eval tasks: score the first N items of each")
    parser.add_argument("--json", action="store_true", help="print {task: {metric: value}} as JSON")
    args = parser.parse_args(argv)
    files = [t for t in args.tasks if t.endswith(".jsonl")]
    names = [t for t in args.tasks if not t.endswith(".jsonl")]
    by_task: dict[str, dict[str, float]] = {}
    items: dict[str, int] = {}
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
        model, cfg = load_model(args.checkpoint)
        if cfg.model.arch != "gpt":
            raise CheckpointError(f"{args.checkpoint} holds a {cfg.model.arch} model; scoring continuations needs a "
                                  "gpt")
        from pretrain.downstream import Downstream, checkpoint_tokenizer, load_task

        tok = checkpoint_tokenizer(args.checkpoint, cfg, args.tokenizer)
        tasks = [load_task(f) for f in files]  # every file checked before anything runs
        items = {t.name: len(t.items) for t in tasks}
        if args.backend == "native" and files:
            downstream = Downstream(files, tok, cfg.model.vocab_size, cfg.model.seq_len, args.batch_size)
            with torch.no_grad():
                values = downstream.evaluate(model, torch.device("cpu"), select=True)
            for task in downstream.tasks:
                by_task[task.name] = {key[len(task.name) + 1:]: value for key, value in values.items()
                                      if key.startswith(task.name + "_")}
        if names or args.backend == "hf":
            by_task.update(lm_eval_scores(args, model, cfg, tok, tasks, names))
    except (CheckpointError, TokenizerError, DataError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(by_task, indent=1))
        return 0
    print(f"{'task':24s} {'metric':10s} {'value':>10s}  items")
    for task, metrics in by_task.items():
        for metric, value in metrics.items():
            print(f"{task:24s} {metric:10s} {value:10.4f}  {items.get(task, '')}")
    return 0


def lm_eval_scores(args, model, cfg, tok, tasks, names: list[str]) -> dict[str, dict[str, float]]:
    """The lm-eval part: ``names`` (and with ``--backend hf`` the task files, through their YAMLs)."""
    from pretrain.lm_eval_model import PretrainLM  # the extra's one-line error when lm-eval is missing

    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        include = list(args.include_path)
        if args.backend == "hf" and tasks:
            from pretrain.downstream import write_task_yaml

            folder = Path(tmp) / "tasks"
            folder.mkdir()
            for task in tasks:
                write_task_yaml(Path(task.path), task.kind, folder)
            include.append(str(folder))
            names = names + [t.name for t in tasks]
        if args.backend == "native":
            lm = PretrainLM(model=model, cfg=cfg, tok=tok, batch_size=args.batch_size)
        else:
            from lm_eval.models.huggingface import HFLM

            from pretrain.checkpoint.hf import export_hf, run_tokenizer

            tokenizer = run_tokenizer(cfg, args.tokenizer)
            if tokenizer is None:
                raise UserError("--backend hf needs the run's tokenizer file to export with (--tokenizer)")
            folder = export_hf(model, cfg.model, Path(tmp) / "hf", tokenizer)
            # logits_cache off: lm-eval's one-token-continuation cache (0.4.13) gathers the wrong position when one
            # request's context + continuation[:-1] equals another's with a longer continuation
            # prefix EOS: what an empty context and the first rolling window are conditioned on, as the pretrain
            # model does (documents end with EOS here; the hf model would take the tokenizer's BOS)
            lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.batch_size,
                      logits_cache=False, prefix_token_id=tok.eos_id)
        return run_lm_eval(lm, names, include, args.batch_size, args.limit)


if __name__ == "__main__":
    sys.exit(main())
