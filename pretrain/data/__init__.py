"""Data path: tokenizer -> prepared shards (or Megatron .bin/.idx) -> global sample sets -> per-rank loader."""

from __future__ import annotations

from pretrain.config import Config
from pretrain.data.prepare import DataError

VAL_SEED_OFFSET = 1_000_003  # synthetic validation draws a disjoint stream


def build_samples(cfg: Config, split: str = "train"):
    """The global sample set of a split: synthetic, one prepared store, or a weighted blend of several."""
    m, d = cfg.model, cfg.data
    train = split == "train"
    if d.source == "synthetic":
        from pretrain.data.synthetic import SyntheticSamples

        return SyntheticSamples(m.vocab_size, m.seq_len, seed=d.seed if train else d.seed + VAL_SEED_OFFSET,
                                mode=m.arch, mlm_probability=d.mlm_probability,
                                max_predictions=d.max_predictions_per_seq, documents=d.document_mask,
                                reset_positions=d.reset_positions, mask_boundary=d.mask_document_boundary,
                                doc_len=d.synthetic_doc_len)
    from pretrain.data.blend import Blend
    from pretrain.data.documents import open_documents
    from pretrain.data.samples import DocumentSamples

    def samples_of(path: str):
        store = open_documents(path, split, tokenizer_path=d.tokenizer or None, on_bad_sample=d.on_bad_sample)
        if store.vocab_size is not None and store.vocab_size > m.vocab_size:
            raise DataError(f"tokenizer vocab ({store.vocab_size}) of {path} is larger than model.vocab_size "
                            f"({m.vocab_size})")
        return DocumentSamples(store, m.arch, m.seq_len, seed=d.seed, shuffle=d.shuffle and train, loop=train,
                               shuffle_window=d.shuffle_window, mlm_probability=d.mlm_probability,
                               max_predictions=d.max_predictions_per_seq, whole_word_mask=d.whole_word_mask,
                               pairs=d.bert_pairs, documents=d.document_mask, reset_positions=d.reset_positions,
                               mask_boundary=d.mask_document_boundary)

    if not d.sources:
        samples = samples_of(d.path)
        samples.tokenizer_hash = samples.store.tokenizer_hash
        return samples
    sets = [samples_of(src["path"]) for src in d.sources]
    hashes = [s.store.tokenizer_hash for s in sets]
    for i, digest in enumerate(hashes[1:], 1):
        if digest != hashes[0]:
            from pretrain.data.manifest import short

            raise DataError(f"data.sources[{i}] {d.sources[i]['path']} was prepared with tokenizer {short(digest)}, "
                            f"data.sources[0] {d.sources[0]['path']} with {short(hashes[0])}: a blend needs one "
                            "tokenizer")
    blend = Blend(sets, [src.get("weight", 1.0) for src in d.sources])
    blend.tokenizer_hash = hashes[0]
    return blend


def build_stream(cfg: Config, split: str = "train", rank: int = 0, world: int = 1, pin_memory: bool = False):
    """The batch loader a run trains (split="train") or evaluates (split="val") on, for one DP rank."""
    from pretrain.data.stream import Loader

    samples = build_samples(cfg, split)
    loader = Loader(samples, cfg.train.micro_batch_size, rank=rank, world=world, num_workers=cfg.data.num_workers,
                    pin_memory=pin_memory, prefetch_factor=cfg.data.prefetch_factor)
    loader.tokenizer_hash = getattr(samples, "tokenizer_hash", None)  # None: synthetic tokens
    return loader
