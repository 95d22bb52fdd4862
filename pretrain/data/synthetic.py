"""Seeded random tokens for throughput runs and tests: no files.

Sample i of the global stream depends only on (seed, i), so any data-parallel layout that consumes the same
global batches sees the same samples (rank r takes samples s with s % world == r). GPT batches are
{"tokens", "targets"}; BERT batches are masked like real data (``data/mlm.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from pretrain.data.mlm import mask_tokens

# ids reserved like the sentencepiece models trained here: pad 0, unk 1, bos 2, eos 3, mask 4, cls 5, sep 6
PAD, MASK, CLS, SEP, FIRST_ORDINARY = 0, 4, 5, 6, 8


class SyntheticStream:
    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, mode: str = "gpt", mlm_probability: float = 0.15):
        if vocab_size <= FIRST_ORDINARY:
            raise ValueError(f"synthetic data needs a vocab larger than {FIRST_ORDINARY}")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.rank, self.world, self.seed, self.mode, self.mlm_probability = rank, world, seed, mode, mlm_probability
        self.sequence = 0

    def state_dict(self) -> dict:
        return {"sequence": self.sequence}

    def load_state_dict(self, state: dict) -> None:
        self.sequence = int(state["sequence"])

    def _sample(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        length = self.seq_len + 1 if self.mode == "gpt" else self.seq_len
        return rng.integers(FIRST_ORDINARY, self.vocab_size, size=length, dtype=np.int64)

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = []
        while len(indices) < self.batch_size:
            if self.sequence % self.world == self.rank:
                indices.append(self.sequence)
            self.sequence += 1
        rows = [self._sample(i) for i in indices]
        if self.mode == "gpt":
            seqs = torch.from_numpy(np.stack(rows))
            return {"tokens": seqs[:, :-1].contiguous(), "targets": seqs[:, 1:].contiguous()}
        tokens, labels = [], []
        for index, row in zip(indices, rows):
            row[0], row[-1] = CLS, SEP
            valid = np.ones_like(row, dtype=bool)
            rng = np.random.default_rng([self.seed, index, 1])
            masked, label = mask_tokens(row, valid, rng, MASK, self.vocab_size, self.mlm_probability, [CLS, SEP])
            tokens.append(masked), labels.append(label)
        n = len(rows)
        return {"tokens": torch.from_numpy(np.stack(tokens)),
                "attention_mask": torch.ones(n, self.seq_len, dtype=torch.bool),
                "labels": torch.from_numpy(np.stack(labels))}

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()
