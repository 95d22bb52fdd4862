"""BERT masked-LM corruption (Devlin et al. 2019) and sentence pairs.

Masking: of the real (non-special, non-padding) tokens, ``round(probability · n)`` are picked — at least one,
at most ``max_predictions`` when given; of those 80 % become ``<mask>``, 10 % a random token, 10 % stay.
With ``word_starts`` (a per-vocab boolean table) whole words are picked: a word is a token that starts one
plus the tokens that continue it, and words are added in random order while they fit the budget, as the
reference implementation does. Labels are -100 everywhere except the picked positions.

Pairs: ``"nsp"`` (next-sentence prediction: segment B is the true continuation or, half of the time, text
from a random other sample; label 1 = random) and ``"sop"`` (sentence order, ALBERT: the two halves of a
chunk, swapped half of the time; label 1 = swapped). Input ``<cls> A <sep> B <sep>`` with token types 0 / 1.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def mask_tokens(tokens: np.ndarray, valid: np.ndarray, rng: np.random.Generator, mask_id: int, vocab_size: int,
                probability: float, special_ids, max_predictions: int = 0,
                word_starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """tokens (T,) int64, valid (T,) bool (False at padding) -> (corrupted tokens, labels)."""
    candidates = valid & ~np.isin(tokens, special_ids)
    positions = np.flatnonzero(candidates)
    picked = np.zeros(tokens.shape, dtype=bool)
    if len(positions):
        budget = max(1, int(round(probability * len(positions))))
        if max_predictions:
            budget = min(budget, max_predictions)
        if word_starts is None:
            picked[rng.choice(positions, size=budget, replace=False)] = True
        else:
            # a word starts at a word-start token or after any non-candidate (special, padding, boundary)
            starts = word_starts[tokens[positions]]
            starts[0] = True
            starts[1:] |= np.diff(positions) > 1
            words = np.split(positions, np.flatnonzero(starts[1:]) + 1)
            count = 0
            for w in rng.permutation(len(words)):
                if count >= budget:
                    break
                if count + len(words[w]) > budget:
                    continue
                picked[words[w]] = True
                count += len(words[w])
            if count == 0:  # every word longer than the budget: take a piece of one
                picked[words[int(rng.integers(len(words)))][:budget]] = True
    labels = np.where(picked, tokens, IGNORE_INDEX)
    roll = rng.random(tokens.shape)
    out = tokens.copy()
    out[picked & (roll < 0.8)] = mask_id
    randomise = picked & (roll >= 0.8) & (roll < 0.9)
    out[randomise] = rng.integers(0, vocab_size, size=int(randomise.sum()))
    return out, labels


def make_pair(chunk: np.ndarray, other: np.ndarray | None, rng: np.random.Generator, kind: str
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """Split ``chunk`` into segments A, B for NSP / SOP. Returns (A, B, label)."""
    if len(chunk) < 2:
        return chunk, chunk[:0], 0
    cut = int(rng.integers(1, len(chunk)))
    a, b = chunk[:cut], chunk[cut:]
    if kind == "sop":
        if rng.random() < 0.5:
            return b, a, 1
        return a, b, 0
    if other is not None and len(other) and rng.random() < 0.5:
        return a, other[:len(b)], 1
    return a, b, 0


def word_start_table(tokenizer) -> np.ndarray:
    """Per vocab id: does this piece start a word (sentencepiece ``▁`` prefix, a special, or a newline)?"""
    sp = tokenizer.sp
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    for i in range(tokenizer.vocab_size):
        piece = sp.id_to_piece(i)
        table[i] = piece.startswith("\u2581") or piece == "\n" or sp.is_control(i) or sp.is_unknown(i) or (
            piece.startswith("<") and not sp.is_byte(i))
    return table
