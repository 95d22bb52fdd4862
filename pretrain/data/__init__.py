"""Data path: tokenizer -> prepared shards -> packed, resumable batches (or synthetic tokens)."""

from __future__ import annotations

from pretrain.config import Config
from pretrain.data.prepare import DataError


def build_stream(cfg: Config, split: str = "train", rank: int = 0, world: int = 1):
    """The batch stream a run trains (split="train") or evaluates (split="val") on, for one DP rank."""
    m, d, t = cfg.model, cfg.data, cfg.train
    mode = m.arch
    if d.source == "synthetic":
        from pretrain.data.synthetic import SyntheticStream

        seed = d.seed if split == "train" else d.seed + 1_000_003  # a disjoint stream for validation
        return SyntheticStream(m.vocab_size, m.seq_len, t.micro_batch_size, rank=rank, world=world, seed=seed,
                               mode=mode, mlm_probability=d.mlm_probability)
    if d.source == "shards":
        from pretrain.data.stream import PackedStream, ShardDataset

        if d.sources:
            raise DataError("data.sources (blending) is not supported yet: use data.path")
        dataset = ShardDataset(d.path, split, tokenizer_path=d.tokenizer or None)
        if dataset.vocab_size > m.vocab_size:
            raise DataError(f"tokenizer vocab ({dataset.vocab_size}) of {d.path} is larger than model.vocab_size "
                            f"({m.vocab_size})")
        return PackedStream(dataset, m.seq_len, t.micro_batch_size, rank=rank, world=world,
                            shuffle=d.shuffle and split == "train", seed=d.seed, loop=split == "train", mode=mode,
                            mlm_probability=d.mlm_probability)
    raise DataError(f"data.source = {d.source!r} is not available yet (use shards or synthetic)")
