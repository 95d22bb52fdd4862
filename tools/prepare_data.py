#!/usr/bin/env python3
"""Tokenize a corpus into webdataset shards + manifest: see pretrain/data/prepare.py."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data.prepare import DataError, prepare  # noqa: E402
from pretrain.data.tokenizer import TokenizerError  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.files import disk_error  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", nargs="+", required=True,
                        help="files, directories, globs, or 'builtin' (this Python's standard library sources)")
    parser.add_argument("--output", required=True, help="directory to create (an earlier prepared set there is replaced only with --overwrite; anything else, or an input, never)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tokenizer",
                       help="an existing sentencepiece model, or a Hugging Face tokenizer.json or model directory "
                            "(to continue pretraining that model on its own token ids)")
    group.add_argument("--vocab-size", type=int, default=8192, help="train a BPE tokenizer of this size (default 8192)")
    parser.add_argument("--jsonl-field", default="text", help="field holding the text in .jsonl inputs (default text)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents held out for validation (default 0.01)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16M)")
    parser.add_argument("--workers", type=int, default=1,
                        help="encoding processes (default 1: one process already encodes on one thread per core; "
                             "more help when reading / parsing the input is the bottleneck)")
    parser.add_argument("--format", default="shards", choices=("shards", "megatron"),
                        help="webdataset shards + index (default), or Megatron .bin/.idx (needs megatron-core)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)

    received: list[int] = []

    def stop(signum, frame):  # unwind so the temporary output is removed
        received.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        manifest = prepare(args.input, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                           jsonl_field=args.jsonl_field, val_fraction=args.val_fraction,
                           shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite,
                           progress=not args.quiet, fmt=args.format, stopped=lambda: bool(received))
    except (DataError, TokenizerError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk: the temporary output is already removed
        if disk_error(exc) is None:
            raise
        print(f"error: {disk_error(exc, args.output)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written (the temporary output was removed)", file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    splits = manifest["splits"]
    where = f"in {len(splits['train']['shards'])} shards" if "shards" in splits["train"] else "in train.bin"
    print(f"wrote {args.output}: train {splits['train']['tokens']:,} tokens {where}, "
          f"val {splits['val']['tokens']:,} tokens; vocab {manifest['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
