#!/usr/bin/env python3
"""Microbenchmark the Triton kernels against torch and the strongest available baselines (logic in
kernels/bench.py): TFLOP/s, GB/s and % of the measured copy-bandwidth / matmul peaks, CSV + PNG.

    python tools/bench_kernels.py --op attention --dtype bf16 --seq 4096 8192 16384
    python tools/bench_kernels.py --op attention --seq 8192 32768 --doc-len 512 2048   # packed documents
    python tools/bench_kernels.py --op all
    python tools/bench_kernels.py --check          # correctness only; runs on CPU through the interpreter
    python tools/bench_kernels.py --ce-memory 4096 2048 128256   # fused vs unfused CE peak memory (CPU ok)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def main(argv=None) -> int:
    try:
        return _main(argv)
    except RuntimeError as exc:  # a missing extra (triton): one line naming it, not a traceback
        if "pip install" not in str(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="all", help="attention | adamw | rmsnorm | layernorm | cross_entropy | "
                                                   "rotary | all")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384], help="attention lengths")
    parser.add_argument("--doc-len", type=int, nargs="*", default=[], metavar="N",
                        help="attention: also rows packed with documents of N tokens (document masking)")
    parser.add_argument("--out", default="runs/bench_kernels", help="directory for the CSV and PNG")
    parser.add_argument("--check", action="store_true", help="correctness only (small shapes; CPU interpreter ok)")
    parser.add_argument("--ce-memory", nargs=3, type=int, metavar=("TOKENS", "DIM", "VOCAB"), const=None,
                        help="peak memory above the inputs of fused vs unfused linear + cross-entropy forward + "
                             "backward at this shape (e.g. 4096 2048 128256); runs on CPU without the interpreter")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.doc_len):
        print(f"error: --doc-len must be >= 1, got {min(args.doc_len)}", file=sys.stderr)
        return 2

    import torch

    from pretrain.kernels.bench import OPS

    if args.op != "all" and args.op not in OPS:
        print(f"error: unknown op {args.op!r}: one of {', '.join(OPS)}, all", file=sys.stderr)
        return 2
    if args.ce_memory:
        from pretrain.kernels.bench import cross_entropy_memory

        tokens, dim, vocab = args.ce_memory
        peaks = cross_entropy_memory(tokens, dim, vocab, getattr(torch, DTYPES[args.dtype]))
        print(f"linear + cross-entropy N{tokens} D{dim} V{vocab} {args.dtype}, peak MiB above the inputs: "
              f"fused {peaks['fused'] / 2 ** 20:.1f}, unfused {peaks['unfused'] / 2 ** 20:.1f}, "
              f"ratio {peaks['fused'] / peaks['unfused']:.3f}")
        return 0

    if args.check:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton.jit code is imported
        from pretrain.kernels.bench import check

        report = check()
        print("\n".join(report))
        return 0 if report[-1] == "all ok" else 1
    if not torch.cuda.is_available():
        print("error: timing needs a CUDA GPU (none visible); run with --check for correctness in the interpreter",
              file=sys.stderr)
        return 2
    from pretrain.kernels.bench import OPS, run

    ops = list(OPS) if args.op == "all" else [args.op]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        print(f"error: unknown op {unknown[0]!r}: one of {', '.join(OPS)}, all", file=sys.stderr)
        return 2
    run(ops, getattr(torch, DTYPES[args.dtype]), args.seq, Path(args.out), tuple(args.doc_len))
    write_autotune_picks(Path(args.out) / "autotune_picks.json")
    return 0


def write_autotune_picks(path: Path) -> None:
    """What triton.autotune chose for each attention kernel and key (T bucket, head dim, causal, mask, dtypes)."""
    import json

    from pretrain.kernels.attention import TUNED

    picks = {name: {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
             for name, tuner in TUNED.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(picks, indent=1))
    print(f"autotune picks -> {path}")


if __name__ == "__main__":
    sys.exit(main())
