"""Seeded random tokens for throughput runs and tests: no files.

Sample g of the global stream depends only on (seed, g), like every sample set (``data/samples.py``), so any
data-parallel layout that consumes the same global batches sees the same samples. GPT samples are
{"tokens", "targets"}; BERT samples are masked like real data (``data/mlm.py``). Random tokens have no
documents: with ``documents`` (``data.document_mask``) each row is cut into synthetic ones, their lengths drawn
(geometric, mean ``doc_len``) from (seed, g) too, and carries the same ``document_ids`` / ``positions`` fields as
real data (``data/samples.py``).
"""

from __future__ import annotations

import numpy as np

from pretrain.data.mlm import mask_tokens

# ids reserved like the sentencepiece models trained here: pad 0, unk 1, bos 2, eos 3, mask 4, cls 5, sep 6
PAD, MASK, CLS, SEP, FIRST_ORDINARY = 0, 4, 5, 6, 8


class SyntheticSamples:
    def __init__(self, vocab_size: int, seq_len: int, *, seed: int = 0, mode: str = "gpt",
                 mlm_probability: float = 0.15, max_predictions: int = 0, documents: bool = False,
                 reset_positions: bool = False, mask_boundary: bool = False, doc_len: int = 0):
        if vocab_size <= FIRST_ORDINARY:
            raise ValueError(f"synthetic data needs a vocab larger than {FIRST_ORDINARY}")
        self.vocab_size, self.seq_len, self.seed, self.mode = vocab_size, seq_len, seed, mode
        self.mlm_probability, self.max_predictions = mlm_probability, max_predictions
        self.documents, self.reset_positions, self.mask_boundary = documents, reset_positions, mask_boundary
        self.doc_len = doc_len or max(1, seq_len // 4)

    def _document_ids(self, g: int, length: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, g, 2])
        lengths = rng.geometric(1.0 / self.doc_len, size=length)  # >= 1 each: enough to cover the row
        return np.repeat(np.arange(length, dtype=np.int32), lengths)[:length]

    def sample(self, g: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, g])
        length = self.seq_len + 1 if self.mode == "gpt" else self.seq_len
        row = rng.integers(FIRST_ORDINARY, self.vocab_size, size=length, dtype=np.int64)
        meta = {"index": np.int64(g), "skipped": np.int64(0)}
        if self.mode == "gpt":
            out = {"tokens": row[:-1], "targets": row[1:].copy(), **meta}
            if self.documents:
                from pretrain.data.samples import document_fields

                out.update(document_fields(self._document_ids(g, length), out["targets"], self.reset_positions,
                                           self.mask_boundary))
            return out
        row[0], row[-1] = CLS, SEP
        valid = np.ones_like(row, dtype=bool)
        masked, labels = mask_tokens(row, valid, np.random.default_rng([self.seed, g, 1]), MASK, self.vocab_size,
                                     self.mlm_probability, [CLS, SEP], self.max_predictions)
        out = {"tokens": masked, "attention_mask": valid, "labels": labels, **meta}
        if self.documents:  # several documents a row, attending each within itself (BERT packing)
            from pretrain.data.samples import document_fields

            ids = self._document_ids(g, length)
            out.update(document_fields(np.append(ids, ids[-1]), None, self.reset_positions, False))
        return out
