"""Global sample index -> training sample, by arithmetic: the heart of exact, O(1), reshardable resume.

A sample set maps every global index ``g = 0, 1, 2, ...`` to one sample (a dict of numpy arrays); the loader
(``data/stream.py``) only decides which indices a rank and a worker take. Nothing is replayed to reach ``g``.

``DocumentSamples`` over a document store (``data/documents.py``), per epoch ``e = g // S``:

- Document order: a seeded permutation of the shards, and of the documents inside each shard (identity with
  ``shuffle = False``). Each epoch reshuffles with seed ``[seed, e]``.
- GPT: the documents in that order, each followed by EOS, form one token stream (Megatron's GPTDataset);
  sequence ``q`` is tokens ``[q·T, q·T + T + 1)`` (inputs the first T, targets the last T), so documents longer
  than T run on across sequences and ``S = (tokens - 1) // T``; the remainder shorter than one sequence is left
  out of that epoch only. BERT: each document is cut into chunks of ``T - 2`` tokens (``T - 3`` with sentence
  pairs), one sample each, ``<cls> chunk <sep>`` padded to T, and masked per sample with seed ``[seed, g]``.
- Sample order: position ``j`` of the epoch reads sequence ``q = block·W + π(j mod W)`` where π is a seeded
  Feistel permutation of the block of ``W = shuffle_window`` positions: a full shuffle within each window, O(1)
  memory, and reads that stay within the few shards a window covers.

With ``documents`` (``data.document_mask``) a GPT sample also carries ``document_ids`` (T,) int32: the documents
of its tokens numbered from 0 in the order they appear — known while the tokens are gathered, so nothing is read
twice and resume stays O(1) —, a document's EOS belonging to it. A document that runs on across samples starts the
next sample as a document of its own (attention never crosses samples anyway). With ``reset_positions`` it carries
``positions`` (T,): each token's offset in its document (in that sample). With ``mask_boundary`` the target of a
document's last token (the next document's first token, which the masked attention cannot predict from anything
but the start distribution) is left out of the loss. A BERT sample is one document already (one chunk of one
document, padded): its ``document_ids`` are all 0.

Locating a position costs two binary searches: over the epoch's shard order (O(shards) per epoch, cached) and
over the documents of one shard (O(docs in the shard), cached for recently used shards).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from pretrain.data.mlm import IGNORE_INDEX, make_pair, mask_tokens
from pretrain.data.prepare import DataError

MASK64 = (1 << 64) - 1


class EndOfData(Exception):
    """A finite (non-looping) sample set has no sample at this index."""


class Permutation:
    """A seeded pseudo-random bijection of [0, n), evaluated one index at a time in O(1) memory: a 4-round
    Feistel network over the smallest even power of two >= n, with cycle walking back into range."""

    def __init__(self, n: int, seed):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [int(k) for k in np.random.default_rng(seed).integers(0, 1 << 62, size=4)]

    def _round(self, x: int, key: int) -> int:
        x = ((x ^ key) * 0x9E3779B97F4A7C15) & MASK64
        x ^= x >> 29
        x = (x * 0xBF58476D1CE4E5B9) & MASK64
        x ^= x >> 32
        return x & self.mask

    def __call__(self, i: int) -> int:
        if self.n <= 1:
            return i
        while True:
            left, right = i >> self.half, i & self.mask
            for key in self.keys:
                left, right = right, left ^ self._round(right, key)
            i = (left << self.half) | right
            if i < self.n:
                return i


def document_fields(ids: np.ndarray, targets: np.ndarray | None, reset_positions: bool,
                    mask_boundary: bool) -> dict[str, np.ndarray]:
    """A sample's document fields from ``ids`` (T + 1,): each token's document (nondecreasing, from 0), the last
    one the final target's. ``targets`` (T,) is masked in place at document boundaries with ``mask_boundary``."""
    inputs = ids[:-1]
    out = {"document_ids": inputs.copy()}
    if reset_positions:
        t = np.arange(len(inputs))
        new = np.ones(len(inputs), dtype=bool)
        new[1:] = inputs[1:] != inputs[:-1]
        out["positions"] = t - np.maximum.accumulate(np.where(new, t, 0))
    if mask_boundary and targets is not None:
        targets[ids[1:] != inputs] = IGNORE_INDEX  # a document's last token predicting the next one's first
    return out


class DocumentSamples:
    """GPT or BERT samples over a document store, looping over epochs (or finite with ``loop=False``)."""

    cache_slots = 256  # shards whose per-epoch document order is kept

    def __init__(self, store, mode: str, seq_len: int, *, seed: int = 0, shuffle: bool = True, loop: bool = True,
                 shuffle_window: int = 1 << 16, tokenizer=None, mlm_probability: float = 0.15,
                 max_predictions: int = 0, whole_word_mask: bool = False, pairs: str = "none",
                 documents: bool = False, reset_positions: bool = False, mask_boundary: bool = False):
        if mode not in ("gpt", "bert"):
            raise ValueError(f"mode must be gpt or bert, got {mode!r}")
        self.store, self.mode, self.seq_len = store, mode, seq_len
        self.seed, self.shuffle, self.loop, self.window = seed, shuffle, loop, max(1, shuffle_window)
        self.pairs, self.mlm_probability, self.max_predictions = pairs, mlm_probability, max_predictions
        self.documents, self.reset_positions, self.mask_boundary = documents, reset_positions, mask_boundary
        self.eos = int(store.eos_id) if store.append_eos else None
        if mode == "gpt":
            if store.append_eos and store.eos_id is None:
                raise DataError("the data has no EOS id: set data.tokenizer")
            self.doc_units = [np.asarray(store.lengths(s), np.int64) + (1 if store.append_eos else 0)
                              for s in range(store.num_shards)]
        else:
            self.body = seq_len - (3 if pairs != "none" else 2)
            if self.body < 1:
                raise DataError(f"model.seq_len = {seq_len} leaves no room for tokens between <cls> and <sep>")
            self.doc_units = [-(-np.asarray(store.lengths(s), np.int64) // self.body)
                              for s in range(store.num_shards)]
            tokenizer = tokenizer or store.tokenizer()
            self.cls, self.sep, self.pad, self.mask = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id
            self.special_ids = np.array([tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                                         tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id])
            self.vocab_size = tokenizer.vocab_size
            self.word_starts = None
            if whole_word_mask:
                from pretrain.data.mlm import word_start_table

                self.word_starts = word_start_table(tokenizer)
        self.shard_units = np.array([int(u.sum()) for u in self.doc_units], dtype=np.int64)
        total = int(self.shard_units.sum())
        self.per_epoch = (total - 1) // seq_len if mode == "gpt" else total
        if self.per_epoch <= 0:
            what = f"{total} tokens, fewer than one sequence of {seq_len} + 1" if mode == "gpt" else "no tokens"
            raise DataError(f"the data holds {what}")
        self._epochs: OrderedDict[int, tuple] = OrderedDict()
        self._slots: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], Permutation] = OrderedDict()

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.per_epoch

    # --- where things are -------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._epochs.get(epoch)
        if cached is None:
            n = len(self.shard_units)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            cached = (order, np.concatenate([[0], np.cumsum(self.shard_units[order])]))
            self._epochs[epoch] = cached
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return cached

    def _slot(self, epoch: int, slot: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(shard, its documents in this epoch's order, their starting units)."""
        key = (epoch, slot)
        cached = self._slots.get(key)
        if cached is None:
            shard = int(self._epoch(epoch)[0][slot])
            units = self.doc_units[shard]
            docs = (np.random.default_rng([self.seed, epoch, shard]).permutation(len(units)) if self.shuffle
                    else np.arange(len(units)))
            cached = (shard, docs, np.concatenate([[0], np.cumsum(units[docs])]))
            self._slots[key] = cached
            if len(self._slots) > self.cache_slots:
                self._slots.popitem(last=False)
        else:
            self._slots.move_to_end(key)
        return cached

    def _locate(self, epoch: int, unit: int) -> tuple[int, int, int]:
        """(slot, position in the slot's document order, unit offset inside that document)."""
        starts = self._epoch(epoch)[1]
        slot = int(np.searchsorted(starts, unit, side="right")) - 1
        _, _, doc_starts = self._slot(epoch, slot)
        local = unit - int(starts[slot])
        j = int(np.searchsorted(doc_starts, local, side="right")) - 1
        return slot, j, local - int(doc_starts[j])

    def position(self, g: int) -> tuple[int, int]:
        """(epoch, sequence index inside it) of global sample g."""
        epoch, j = divmod(g, self.per_epoch)
        if epoch > 0 and not self.loop:
            raise EndOfData
        if not self.shuffle:
            return epoch, j
        block, offset = divmod(j, self.window)
        size = min(self.window, self.per_epoch - block * self.window)
        key = (epoch, block)
        perm = self._perms.get(key)
        if perm is None:
            perm = Permutation(size, [self.seed, epoch, block, 7])
            self._perms[key] = perm
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return epoch, block * self.window + perm(offset)

    # --- reading --------------------------------------------------------------------------------------------
    def _tokens(self, epoch: int, start: int, count: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """``count`` tokens of the epoch's GPT stream from ``start``; and whether a bad document was in it.
        ``ids`` (count,): filled with each token's document, numbered from 0."""
        out = np.empty(count, dtype=np.int64)
        doc_number = 0
        slot, j, within = self._locate(epoch, start)
        n_slots = len(self.shard_units)
        filled, bad = 0, False
        while filled < count:
            shard, docs, _ = self._slot(epoch, slot)
            if j >= len(docs):
                slot, j, within = slot + 1, 0, 0
                if slot >= n_slots:
                    raise AssertionError("read past the end of the epoch")
                continue
            doc = self.store.document(shard, int(docs[j]))
            if doc is None:
                bad = True
                length = int(self.store.lengths(shard)[docs[j]])
                doc = np.full(length, self.eos if self.eos is not None else 0, dtype=np.int64)
            body = len(doc)
            take = min(count - filled, body + (self.eos is not None) - within)
            from_doc = max(0, min(take, body - within))
            out[filled:filled + from_doc] = doc[within:within + from_doc]
            if from_doc < take:
                out[filled + from_doc] = self.eos
            if ids is not None:
                ids[filled:filled + take] = doc_number
                doc_number += 1
            filled += take
            j, within = j + 1, 0
        return out, bad

    def _chunk(self, epoch: int, q: int) -> tuple[np.ndarray, bool]:
        slot, j, c = self._locate(epoch, q)
        shard, docs, _ = self._slot(epoch, slot)
        doc = self.store.document(shard, int(docs[j]))
        if doc is None:
            return np.zeros(0, dtype=np.int64), True
        return doc[c * self.body:(c + 1) * self.body].astype(np.int64), False

    def sample(self, g: int) -> dict[str, np.ndarray]:
        epoch, q = self.position(g)
        if self.mode == "gpt":
            ids = np.empty(self.seq_len + 1, dtype=np.int32) if self.documents else None
            seq, bad = self._tokens(epoch, q * self.seq_len, self.seq_len + 1, ids)
            targets = seq[1:].copy()
            if bad:
                targets[:] = IGNORE_INDEX
            out = {"tokens": seq[:-1], "targets": targets, "index": np.int64(g), "skipped": np.int64(bad)}
            if ids is not None:
                out.update(document_fields(ids, targets, self.reset_positions, self.mask_boundary))
            return out
        chunk, bad = self._chunk(epoch, q)
        rng = np.random.default_rng([self.seed, g, 1])
        out = self._bert_sample(chunk, bad, g, epoch, rng)
        if self.documents:
            out["document_ids"] = np.zeros(self.seq_len, dtype=np.int32)
            if self.reset_positions:
                out["positions"] = np.arange(self.seq_len, dtype=np.int64)
        return out

    def _bert_sample(self, chunk: np.ndarray, bad: bool, g: int, epoch: int, rng) -> dict[str, np.ndarray]:
        T = self.seq_len
        tokens = np.full(T, self.pad, dtype=np.int64)
        types = np.zeros(T, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        if self.pairs == "none":
            pieces = [[self.cls], chunk, [self.sep]]
        else:
            other = None
            if self.pairs == "nsp":
                other_q = int(rng.integers(self.per_epoch))
                other, _ = self._chunk(epoch, other_q)
            a, b, label = make_pair(chunk, other, rng, self.pairs)
            pieces = [[self.cls], a, [self.sep], b, [self.sep]]
            types[2 + len(a):3 + len(a) + len(b)] = 1
            out["nsp_labels"] = np.int64(label)
        row = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
        tokens[:len(row)] = row
        valid = np.arange(T) < len(row)
        masked, labels = mask_tokens(tokens, valid, rng, self.mask, self.vocab_size, self.mlm_probability,
                                     self.special_ids, self.max_predictions, self.word_starts)
        if bad:
            labels[:] = IGNORE_INDEX
            if "nsp_labels" in out:
                out["nsp_labels"] = np.int64(IGNORE_INDEX)
        out.update({"tokens": masked, "attention_mask": valid, "labels": labels, "index": np.int64(g),
                    "skipped": np.int64(bad)})
        if self.pairs != "none":
            out["token_type_ids"] = types
        return out
