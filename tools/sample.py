#!/usr/bin/env python3
"""Generate text from a checkpoint: python tools/sample.py --checkpoint runs/gpt_tiny/checkpoints --prompt 'def '"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.checkpoint import CheckpointError, load_model, resolve_checkpoint  # noqa: E402
from pretrain.data.documents import ShardDataset  # noqa: E402
from pretrain.data.prepare import DataError  # noqa: E402
from pretrain.data.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from pretrain.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a step directory or a checkpoint directory")
    parser.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    parser.add_argument("--tokens", type=int, default=120, help="new tokens to generate at most (default 120)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 = all (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    parser.add_argument("--tokenizer", help="sentencepiece model or Hugging Face tokenizer.json (default: the one "
                                            "of the run's data.path)")
    args = parser.parse_args(argv)
    try:
        model, cfg = load_model(args.checkpoint)
        if cfg.model.arch != "gpt":
            raise CheckpointError(f"{args.checkpoint} holds a {cfg.model.arch} model; sampling needs a gpt")
        if args.tokens < 1 or args.top_k < 0 or not args.temperature >= 0:
            raise CheckpointError(f"--tokens must be >= 1, --top-k >= 0 and --temperature >= 0 (got {args.tokens}, "
                                  f"{args.top_k}, {args.temperature})")
        tok = Tokenizer.load(args.tokenizer) if args.tokenizer else ShardDataset(cfg.data.path, "train").tokenizer()
        trained_on = json.loads((resolve_checkpoint(args.checkpoint, say=lambda line: None) / "state.json")
                                .read_text()).get("tokenizer_hash")
        if trained_on and tok.hash != trained_on:
            raise TokenizerError(f"tokenizer {args.tokenizer} ({tok.hash[:12]}) is not the one {args.checkpoint} "
                                 f"was trained with ({trained_on[:12]})")
    except (CheckpointError, TokenizerError, DataError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompt = torch.tensor([[tok.bos_id, *tok.encode(args.prompt)]])
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, eos_id=tok.eos_id,
                         generator=torch.Generator().manual_seed(args.seed))
    print(tok.decode(t for t in out[0, 1:].tolist() if t != tok.eos_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
