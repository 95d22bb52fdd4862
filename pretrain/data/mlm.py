"""BERT masked-LM corruption (Devlin et al. 2019): pick ``probability`` of the real tokens; of those 80 % become
``<mask>``, 10 % a random token, 10 % stay. Labels are -100 everywhere except the picked positions."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def mask_tokens(tokens: np.ndarray, valid: np.ndarray, rng: np.random.Generator, mask_id: int, vocab_size: int,
                probability: float, special_ids) -> tuple[np.ndarray, np.ndarray]:
    """tokens (T,) int64, valid (T,) bool (False at padding) -> (corrupted tokens, labels)."""
    candidates = valid & ~np.isin(tokens, special_ids)
    picked = candidates & (rng.random(tokens.shape) < probability)
    if candidates.any() and not picked.any():  # every sequence teaches something
        picked[rng.choice(np.flatnonzero(candidates))] = True
    labels = np.where(picked, tokens, IGNORE_INDEX)
    roll = rng.random(tokens.shape)
    out = tokens.copy()
    out[picked & (roll < 0.8)] = mask_id
    randomise = picked & (roll >= 0.8) & (roll < 0.9)
    out[randomise] = rng.integers(0, vocab_size, size=int(randomise.sum()))
    return out, labels
