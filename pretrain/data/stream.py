"""Prepared shards -> packed training batches, with a small exact resume state.

GPT: documents are concatenated with EOS after each and cut into sequences of ``seq_len + 1`` tokens that
overlap by one (sequence i is tokens[i·T : i·T + T + 1]), as Megatron's GPTDataset does; inputs are the first T,
targets the last T. BERT: each document is cut into chunks of ``seq_len - 2`` tokens wrapped as
``<cls> chunk <sep>`` and padded, then masked (``data/mlm.py``).

Order: each epoch visits shards in a seeded permutation and the documents of a shard in a seeded permutation
(identity when ``shuffle`` is off). Sequence s of the global stream goes to data-parallel rank ``s % world``.

State (saved in every checkpoint): epoch, the epoch-order index of the document at the head of the packing
buffer, the token offset inside it, and the global sequence counter. Resume opens the one shard that holds
that document: nothing before it is replayed.
"""

from __future__ import annotations

import bisect
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from pretrain.data.mlm import mask_tokens
from pretrain.data.prepare import MANIFEST_FORMAT, DataError
from pretrain.data.tokenizer import Tokenizer


class ShardDataset:
    """One split of a prepared directory: manifest checks and whole-shard reads."""

    def __init__(self, path: str | Path, split: str = "train", tokenizer_path: str | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"data dir {self.path} does not exist (make it with tools/prepare_data.py)")
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            if not any(self.path.iterdir()):
                raise DataError(f"data dir {self.path} is empty (make it with tools/prepare_data.py)")
            raise DataError(f"data dir {self.path} has no manifest.json (make it with tools/prepare_data.py)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{manifest_path} is not valid JSON: {exc}") from None
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest")
        if split not in self.manifest["splits"]:
            raise DataError(f"{manifest_path} has no {split!r} split")
        info = self.manifest["splits"][split]
        self.split = split
        self.shards = info["shards"]
        self.tokens = info["tokens"]
        if self.tokens == 0 or not self.shards:
            raise DataError(f"the {split} split of {self.path} holds zero tokens")
        for shard in self.shards:
            if not (self.path / shard["name"]).is_file():
                raise DataError(f"shard {shard['name']} is listed in {manifest_path} but missing")
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.vocab_size = self.manifest["vocab_size"]
        self.eos_id = self.manifest["eos_id"]
        self.tokenizer_path = self.path / self.manifest["tokenizer"]
        if tokenizer_path:
            configured = Tokenizer.load(tokenizer_path)
            if configured.hash != self.manifest["tokenizer_hash"]:
                raise DataError(f"tokenizer {tokenizer_path} differs from the one {self.path} was prepared with")
        self.doc_counts = [s["docs"] for s in self.shards]

    @property
    def num_docs(self) -> int:
        return sum(self.doc_counts)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def read_shard(self, index: int) -> list[np.ndarray]:
        name = self.shards[index]["name"]
        docs: list[np.ndarray] = []
        try:
            with tarfile.open(self.path / name, "r") as tar:
                for member in tar:
                    if member.name.endswith(".tokens"):
                        docs.append(np.frombuffer(tar.extractfile(member).read(), dtype=self.dtype))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"shard {name} is unreadable after {len(docs)} samples: {exc}") from None
        if len(docs) != self.shards[index]["docs"]:
            raise DataError(f"shard {name} holds {len(docs)} samples, the manifest says {self.shards[index]['docs']}")
        return docs


class EpochOrder:
    """Which document comes at position i of an epoch: a shard permutation, then a permutation inside each."""

    def __init__(self, dataset: ShardDataset, seed: int, epoch: int, shuffle: bool):
        self.dataset, self.seed, self.epoch, self.shuffle = dataset, seed, epoch, shuffle
        n = len(dataset.shards)
        self.shard_order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        self.starts = np.concatenate([[0], np.cumsum([dataset.doc_counts[s] for s in self.shard_order])]).tolist()
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def document(self, i: int) -> np.ndarray:
        slot = bisect.bisect_right(self.starts, i) - 1
        if self._cached is None or self._cached[0] != slot:
            shard = int(self.shard_order[slot])
            docs = self.dataset.read_shard(shard)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, shard]).permutation(len(docs))
                docs = [docs[j] for j in perm]
            self._cached = (slot, docs)
        return self._cached[1][i - self.starts[slot]]


class PackedStream:
    """Batches of packed sequences for one data-parallel rank, resumable from ``state_dict()``.

    ``mode="gpt"`` yields {"tokens", "targets"} (B, T); ``mode="bert"`` yields {"tokens", "attention_mask",
    "labels"} (B, T) with ``labels`` = -100 except at masked positions.
    """

    def __init__(self, dataset: ShardDataset, seq_len: int, batch_size: int, *, rank: int = 0, world: int = 1,
                 shuffle: bool = True, seed: int = 0, loop: bool = True, mode: str = "gpt",
                 tokenizer: Tokenizer | None = None, mlm_probability: float = 0.15):
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.rank, self.world, self.shuffle, self.seed, self.loop, self.mode = rank, world, shuffle, seed, loop, mode
        self.mlm_probability = mlm_probability
        if mode == "bert":
            if tokenizer is None:
                tokenizer = dataset.tokenizer()
            self.special = {"cls": tokenizer.cls_id, "sep": tokenizer.sep_id, "pad": tokenizer.pad_id,
                            "mask": tokenizer.mask_id}
            self.special_ids = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                                tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]
        self.load_state_dict({"epoch": 0, "doc": 0, "offset": 0, "sequence": 0})

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.head_epoch, "doc": self.head_doc, "offset": self.head_offset, "sequence": self.sequence}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.sequence = int(state["epoch"]), int(state["sequence"])
        self.head_epoch = self.epoch  # epoch of the buffer head; reading may already be in the next one
        self.head_doc, self.head_offset = int(state["doc"]), int(state["offset"])
        self.order = EpochOrder(self.dataset, self.seed, self.epoch, self.shuffle)
        self.buffer = np.empty(0, dtype=np.int64)
        self.segments: list[list[int]] = []  # [epoch, doc index, tokens of it left in the buffer]
        self.next_doc = self.head_doc
        if self.mode == "gpt" and self.head_doc < len(self.order):
            self._append(self.head_doc, self.head_offset)

    # --- reading ------------------------------------------------------------------------------------------
    def _doc_with_eos(self, i: int) -> np.ndarray:
        return np.append(self.order.document(i).astype(np.int64), self.dataset.eos_id)

    def _append(self, i: int, offset: int = 0) -> None:
        tokens = self._doc_with_eos(i)[offset:]
        self.buffer = np.concatenate([self.buffer, tokens])
        self.segments.append([self.epoch, i, len(tokens)])
        self.next_doc = i + 1

    def _new_epoch(self) -> None:
        if not self.loop:
            raise StopIteration
        self.epoch += 1
        self.order = EpochOrder(self.dataset, self.seed, self.epoch, self.shuffle)
        self.next_doc = 0

    def _consume(self, n: int) -> None:
        """Drop n tokens from the buffer head, moving the head (doc, offset) along."""
        self.buffer = self.buffer[n:]
        while n and self.segments:
            take = min(n, self.segments[0][2])
            self.segments[0][2] -= take
            n -= take
            self.head_offset += take
            if self.segments[0][2] == 0:
                self.segments.pop(0)
                if self.segments:
                    self.head_epoch, self.head_doc = self.segments[0][0], self.segments[0][1]
                else:
                    self.head_epoch, self.head_doc = self.epoch, self.next_doc
                self.head_offset = 0

    def _next_gpt_sequence(self) -> np.ndarray:
        need = self.seq_len + 1
        while len(self.buffer) < need:
            if self.next_doc >= len(self.order):
                # the tail shorter than one sequence is carried into the next epoch's stream
                self._new_epoch()
                if not self.segments:
                    self.head_epoch, self.head_doc, self.head_offset = self.epoch, 0, 0
            self._append(self.next_doc)
        seq = self.buffer[:need].copy()
        self._consume(self.seq_len)  # sequences overlap by one token
        return seq

    def _next_bert_sequence(self) -> tuple[np.ndarray, np.ndarray]:
        body = self.seq_len - 2
        while True:
            if self.head_doc >= len(self.order):
                self._new_epoch()
                self.head_epoch, self.head_doc, self.head_offset = self.epoch, 0, 0
            doc = self.order.document(self.head_doc)
            if self.head_offset < len(doc):
                break
            self.head_doc, self.head_offset = self.head_doc + 1, 0
        chunk = doc[self.head_offset:self.head_offset + body].astype(np.int64)
        self.head_offset += body
        tokens = np.full(self.seq_len, self.special["pad"], dtype=np.int64)
        tokens[0], tokens[1:1 + len(chunk)], tokens[1 + len(chunk)] = self.special["cls"], chunk, self.special["sep"]
        return tokens, tokens != self.special["pad"]

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            index = self.sequence
            row = self._next_gpt_sequence() if self.mode == "gpt" else self._next_bert_sequence()
            self.sequence += 1
            if index % self.world == self.rank:
                rows.append((index, row))
        if self.mode == "gpt":
            seqs = torch.from_numpy(np.stack([r for _, r in rows]))
            return {"tokens": seqs[:, :-1].contiguous(), "targets": seqs[:, 1:].contiguous()}
        tokens, masks, labels = [], [], []
        for index, (row, valid) in rows:
            rng = np.random.default_rng([self.seed, index])  # per-sequence masking: exact on resume
            masked, label = mask_tokens(row, valid, rng, self.special["mask"], self.dataset.vocab_size,
                                        self.mlm_probability, self.special_ids)
            tokens.append(masked), masks.append(valid), labels.append(label)
        return {"tokens": torch.from_numpy(np.stack(tokens)), "attention_mask": torch.from_numpy(np.stack(masks)),
                "labels": torch.from_numpy(np.stack(labels))}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()
