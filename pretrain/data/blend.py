"""A weighted mixture of sample sets, deterministic and resumable by arithmetic.

The global stream is cut into blocks of ``B`` samples. Inside every block the sources take their turns in
the order of Webster's (Sainte-Laguë) divisor method: position p goes to the source with the largest
``weight / (taken + 0.5)``, the sequential rule Megatron's blended index uses. Every block is the same, so
global sample g maps to (source, that source's own index) in O(1): ``block · count[source] + rank[p]``. Any
prefix of a block holds each source within one sample of its share; the whole stream, exactly
``count / B`` (weights rounded to 1/B). Each source loops over its own epochs.
"""

from __future__ import annotations

import numpy as np

from pretrain.data.prepare import DataError


def check_weights(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise DataError("blend needs at least one source")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise DataError(f"blend weights must be finite and non-negative, got {list(weights)}")
    if w.sum() <= 0:
        raise DataError(f"blend weights sum to zero: {list(weights)}")
    return w / w.sum()


class Blend:
    def __init__(self, sets: list, weights, block: int = 1 << 16):
        self.sets, self.block = sets, block
        self.weights = check_weights(weights)
        k = len(sets)
        # seat j of source i has priority w_i / (j + 0.5); a block is the B largest, in decreasing order.
        # Source i can hold at most about w_i·B + 1 seats of them, so only those are ranked.
        sources, seats = [], []
        for i, w in enumerate(self.weights):
            n = min(block, int(np.ceil(w * block)) + 2) if w > 0 else 0
            sources.append(np.full(n, i, dtype=np.int64))
            seats.append(np.arange(n, dtype=np.int64))
        sources, seats = np.concatenate(sources), np.concatenate(seats)
        priority = self.weights[sources] / (seats + 0.5)
        top = np.lexsort((sources, -priority))[:block]  # ties: lower source first
        self.source, self.rank = sources[top], seats[top]
        self.count = np.bincount(self.source, minlength=k)
        starved = [i for i in range(k) if self.weights[i] > 0 and self.count[i] == 0]
        if starved:
            raise DataError(f"blend weight of source {starved[0]} is below 1/{block}: it would never be sampled")
        self.vocab_size = max((getattr(s, "vocab_size", 0) or 0) for s in sets)

    def locate(self, g: int) -> tuple[int, int]:
        b, p = divmod(g, self.block)
        i = int(self.source[p])
        return i, b * int(self.count[i]) + int(self.rank[p])

    def sample(self, g: int) -> dict[str, np.ndarray]:
        i, local = self.locate(g)
        out = self.sets[i].sample(local)
        out["index"] = np.int64(g)
        out["source"] = np.int64(i)
        return out
