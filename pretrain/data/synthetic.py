"""Seeded random tokens for throughput runs and tests: no files.

Sample g of the global stream depends only on (seed, g), like every sample set (``data/samples.py``), so any
data-parallel layout that consumes the same global batches sees the same samples. GPT samples are
{"tokens", "targets"}; BERT samples are masked like real data (``data/mlm.py``).
"""

from __future__ import annotations

import numpy as np

from pretrain.data.mlm import mask_tokens

# ids reserved like the sentencepiece models trained here: pad 0, unk 1, bos 2, eos 3, mask 4, cls 5, sep 6
PAD, MASK, CLS, SEP, FIRST_ORDINARY = 0, 4, 5, 6, 8


class SyntheticSamples:
    def __init__(self, vocab_size: int, seq_len: int, *, seed: int = 0, mode: str = "gpt",
                 mlm_probability: float = 0.15, max_predictions: int = 0):
        if vocab_size <= FIRST_ORDINARY:
            raise ValueError(f"synthetic data needs a vocab larger than {FIRST_ORDINARY}")
        self.vocab_size, self.seq_len, self.seed, self.mode = vocab_size, seq_len, seed, mode
        self.mlm_probability, self.max_predictions = mlm_probability, max_predictions

    def sample(self, g: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, g])
        length = self.seq_len + 1 if self.mode == "gpt" else self.seq_len
        row = rng.integers(FIRST_ORDINARY, self.vocab_size, size=length, dtype=np.int64)
        meta = {"index": np.int64(g), "skipped": np.int64(0)}
        if self.mode == "gpt":
            return {"tokens": row[:-1], "targets": row[1:], **meta}
        row[0], row[-1] = CLS, SEP
        valid = np.ones_like(row, dtype=bool)
        masked, labels = mask_tokens(row, valid, np.random.default_rng([self.seed, g, 1]), MASK, self.vocab_size,
                                     self.mlm_probability, [CLS, SEP], self.max_predictions)
        return {"tokens": masked, "attention_mask": valid, "labels": labels, **meta}
