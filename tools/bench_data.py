#!/usr/bin/env python3
"""Data-path benchmark: loader tokens/s against raw webdataset and a numpy memmap reader of the same tokens,
resume latency at 0 / 10 / 90 % of an epoch, and preprocessing tokens/s against raw sentencepiece encoding.

    python tools/bench_data.py                      # prepares the stdlib corpus into data/bench once
    python tools/bench_data.py --data DIR --out bench_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data.documents import ShardDataset  # noqa: E402
from pretrain.data.prepare import expand_inputs, iter_documents, prepare  # noqa: E402
from pretrain.data.samples import DocumentSamples  # noqa: E402
from pretrain.data.stream import Loader  # noqa: E402
from pretrain.data.tokenizer import Tokenizer  # noqa: E402


def rate(fn, tokens_per_call: int, seconds: float) -> float:
    """Tokens/s of fn() called repeatedly for about ``seconds`` after one warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n * tokens_per_call / (time.perf_counter() - start)


def bench_loader(ds: ShardDataset, seq_len: int, batch: int, seconds: float) -> dict:
    out = {}
    for workers in (0, 2):
        loader = Loader(DocumentSamples(ds, "gpt", seq_len, seed=0), batch, num_workers=workers)
        out[f"ours_{workers}_workers"] = rate(loader.next_batch, batch * seq_len, seconds)

    import webdataset as wds  # the same shards read as a plain webdataset stream, packed the simplest way

    def webdataset_batches():
        while True:
            buffer = np.empty(0, dtype=np.int64)
            urls = [str(ds.path / s["name"]) for s in ds.shards]
            for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
                doc = np.frombuffer(sample["tokens"], dtype=ds.dtype).astype(np.int64)
                buffer = np.concatenate([buffer, doc, [ds.eos_id]])
                while len(buffer) >= batch * seq_len + 1:
                    seqs = np.lib.stride_tricks.sliding_window_view(buffer[:batch * seq_len + 1], seq_len + 1)
                    yield seqs[::seq_len].copy()
                    buffer = buffer[batch * seq_len:]

    it = webdataset_batches()
    out["webdataset_0_workers"] = rate(lambda: next(it), batch * seq_len, seconds)

    with tempfile.TemporaryDirectory() as tmp:  # all tokens in one flat file, random sequence reads
        flat = np.concatenate([np.append(ds.document(s, d), ds.eos_id).astype(ds.dtype)
                               for s in range(ds.num_shards) for d in range(len(ds.lengths(s)))])
        path = Path(tmp) / "tokens.bin"
        flat.tofile(path)
        tokens = np.memmap(path, dtype=ds.dtype, mode="r")
        rng = np.random.default_rng(0)
        n_seq = (len(tokens) - 1) // seq_len

        def memmap_batch():
            starts = rng.integers(0, n_seq, size=batch) * seq_len
            return np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts])

        out["memmap_0_workers"] = rate(memmap_batch, batch * seq_len, seconds)
    return out


def bench_resume(ds: ShardDataset, seq_len: int, batch: int) -> dict:
    out = {}
    samples = DocumentSamples(ds, "gpt", seq_len, seed=0)
    for workers in (0, 2):
        for fraction in (0.0, 0.1, 0.9):
            loader = Loader(DocumentSamples(ds, "gpt", seq_len, seed=0), batch, num_workers=workers)
            start = time.perf_counter()
            loader.load_state_dict({"cursor": int(fraction * len(samples))})
            loader.next_batch()
            out[f"{workers}_workers_at_{int(fraction * 100)}pct"] = time.perf_counter() - start
    return out


def bench_prepare(inputs: list[str], tokenizer: str, repeats: int) -> dict:
    """Best of ``repeats`` interleaved runs each: raw sentencepiece batch encoding of the texts already in memory
    (all cores, as its batch API does by default) against the whole prepare (read, encode, write shards)."""
    tok = Tokenizer.load(tokenizer)
    texts = [d.text for d in iter_documents(expand_inputs(inputs))]
    best: dict[str, float] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(ids) for ids in tok.encode_batch(texts))
        best["sentencepiece_tokens_per_s"] = max(best.get("sentencepiece_tokens_per_s", 0),
                                                 n / (time.perf_counter() - start))
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                manifest = prepare(inputs, Path(tmp) / "out", tokenizer=tokenizer, workers=workers, progress=False)
                seconds = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            key = f"prepare_{workers}_workers_tokens_per_s"
            best[key] = max(best.get(key, 0), tokens / seconds)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/bench", help="prepared dir (made from --input when missing)")
    parser.add_argument("--input", nargs="+", default=["builtin"],
                        help="corpus to prepare when --data is missing (default: builtin, this Python's sources)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size when preparing (default 4096)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (default 2048)")
    parser.add_argument("--batch", type=int, default=8, help="samples per batch (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per loader measurement (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="preprocessing runs, the best counts (default 3)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    for flag, value in (("--seq-len", args.seq_len), ("--batch", args.batch), ("--repeats", args.repeats),
                        ("--vocab-size", args.vocab_size), ("--seconds", args.seconds)):
        if not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        print(f"preparing {' '.join(args.input)} into {data} ...", file=sys.stderr)
        prepare(args.input, data, vocab_size=args.vocab_size, workers=os.cpu_count() or 1, shard_tokens=1 << 21)
    ds = ShardDataset(data, "train")
    print(f"data: {data}, {ds.tokens / 1e6:.1f} M tokens in {ds.num_shards} shards; seq_len {args.seq_len}, "
          f"batch {args.batch}; {os.cpu_count()} CPUs")
    results = {"loader_tokens_per_s": bench_loader(ds, args.seq_len, args.batch, args.seconds),
               "resume_seconds": bench_resume(ds, args.seq_len, args.batch),
               "preprocess": bench_prepare(args.input, str(data / "tokenizer.model"), args.repeats)}
    for name, value in results["loader_tokens_per_s"].items():
        print(f"loader   {name:24s} {value / 1e6:8.2f} M tokens/s")
    for name, value in results["resume_seconds"].items():
        print(f"resume   {name:24s} {value * 1e3:8.1f} ms to the first batch")
    p = results["preprocess"]
    for name, value in p.items():
        ratio = value / p["sentencepiece_tokens_per_s"]
        print(f"prepare  {name:36s} {value / 1e6:6.2f} M tokens/s ({ratio:.2f}x raw sentencepiece)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
