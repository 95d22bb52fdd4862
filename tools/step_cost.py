#!/usr/bin/env python3
"""The step-cost meter (pretrain/plan/step_cost.py): what a training step of a config costs, counted on the CPU
and read as an H100 / H200 / B200 would run it — per token per layer matmul and attention FLOPs, non-matmul
bytes, launches, host syncs, optimizer bytes, and a roofline step time and MFU.

    python tools/step_cost.py --config configs/gpt_1b.toml                     # torch kernels (model.kernels)
    python tools/step_cost.py --config configs/gpt_1b.toml --kernels triton --json
    python tools/step_cost.py --config configs/gpt_1b.toml --peer torchtitan   # a column for torchtitan's Llama-3
    python tools/step_cost.py --config configs/gpt_7b.toml --set train.micro_batch_size=1 --tokens 64,128

The Triton set runs in Triton's interpreter on a machine without a GPU (set here). Exit 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pair(text: str, what: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"error: {what} {text!r} must be two integers, e.g. 128,256") from None
    if not 0 < a < b:
        raise SystemExit(f"error: {what} {text!r} must be two increasing positive integers")
    return a, b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config (default: the built-in defaults)")
    ap.add_argument("--set", nargs="*", default=[], metavar="K=V", help="config overrides")
    ap.add_argument("--kernels", help="torch | triton | a list of ops (default: the config's model.kernels)")
    ap.add_argument("--tokens", default="128,256", help="the two token counts a micro-batch is measured at")
    ap.add_argument("--layers", default="1,2", help="the two layer counts")
    ap.add_argument("--peer", choices=["torchtitan"], help="add a column for the peer's model of the same shape")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    tokens, layers = _pair(args.tokens, "--tokens"), _pair(args.layers, "--layers")

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    from pretrain.config import ConfigError, load_config
    from pretrain.plan.roofline import fmt_table, report
    from pretrain.plan.step_cost import measure, peer_measure

    try:
        cfg = load_config(args.config, args.set)
        kernels = args.kernels or cfg.model.kernels
        from pretrain.models.ops import triton_ops

        triton_ops(kernels)
        ours = measure(cfg, kernels, tokens, layers)
        peer = peer_measure(args.peer, cfg, tokens, layers) if args.peer else None
    except (ConfigError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rep = report(ours, cfg, peer)
    rep["config"] = args.config or "defaults"
    print(json.dumps(rep, indent=1) if args.json else fmt_table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
