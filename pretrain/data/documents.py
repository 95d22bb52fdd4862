"""Document stores: random access to the token ids of document ``d`` of shard ``s``, nothing else.

Two stores share one small interface (``num_shards``, ``lengths(s)``, ``document(s, d)``, ``eos_id``,
``append_eos``, ``vocab_size``, ``tokenizer()``):

- ``ShardDataset``: a directory written by ``tools/prepare_data.py``: webdataset tars plus, beside each
  ``train-000000.tar``, an index ``train-000000.idx`` (a ``.npy`` int64 array, one row per document: byte offset
  of its ``.tokens`` payload inside the tar, token count, CRC-32 of the payload, document number). Reads are
  slices of a memory map of the tar: no tar parsing, no replay. A payload is checked against its CRC the first
  time a process reads it; a bad one raises ``DataError`` naming shard and sample, or with
  ``on_bad_sample="skip"`` is reported as ``None`` (the caller masks it out and counts it).
- ``MegatronDocuments`` (``data/megatron.py``): a Megatron ``.bin/.idx`` pair read through megatron-core.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pretrain.data.manifest import read_manifest, validate_manifest
from pretrain.data.prepare import MANIFEST_FORMAT, MEGATRON_FORMAT, DataError, index_path_for
from pretrain.data.tokenizer import Tokenizer

OFFSET, LENGTH, CRC, KEY = range(4)  # columns of a shard index


def scan_shard(tar_path: Path, itemsize: int) -> np.ndarray:
    """Build a shard index by walking the tar (for shards prepared without one)."""
    rows = []
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if member.name.endswith(".tokens"):
                    payload = tar.extractfile(member).read()
                    key = int(member.name.rsplit("-", 1)[-1].split(".")[0]) if "-" in member.name else len(rows)
                    rows.append((member.offset_data, len(payload) // itemsize, zlib.crc32(payload), key))
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"shard {tar_path.name} is unreadable after {len(rows)} samples: {exc}") from None
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def load_index(path: Path) -> np.ndarray:
    try:
        index = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"shard index {path.name} is unreadable: {exc}") from None
    if index.ndim != 2 or index.shape[1] != 4 or index.dtype != np.int64:
        raise DataError(f"shard index {path.name} has shape {index.shape} {index.dtype}, expected (docs, 4) int64")
    return index


class ShardDataset:
    """One split of a prepared directory; documents addressed as (shard, doc)."""

    append_eos = True
    max_open = 64  # memory maps kept open at once

    def __init__(self, path: str | Path, split: str = "train", tokenizer_path: str | None = None,
                 on_bad_sample: str = "error"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"data dir {self.path} does not exist (make it with tools/prepare_data.py)")
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{self.path / 'manifest.json'} is not a {MANIFEST_FORMAT} manifest")
        validate_manifest(self.path, self.manifest, tokenizer_path)
        self.tokenizer_hash = self.manifest["tokenizer_hash"]
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.path / 'manifest.json'} has no {split!r} split")
        info = self.manifest["splits"][split]
        self.split, self.shards, self.tokens = split, info["shards"], info["tokens"]
        if self.tokens == 0 or not self.shards:
            raise DataError(f"the {split} split of {self.path} holds zero tokens")
        for shard in self.shards:
            if not (self.path / shard["name"]).is_file():
                raise DataError(f"shard {shard['name']} is listed in {self.path / 'manifest.json'} but missing")
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.vocab_size, self.eos_id = self.manifest["vocab_size"], self.manifest["eos_id"]
        self.tokenizer_path = self.path / self.manifest["tokenizer"]
        if on_bad_sample not in ("error", "skip"):
            raise DataError(f'on_bad_sample must be "error" or "skip", got {on_bad_sample!r}')
        self.on_bad_sample = on_bad_sample
        self.index = [self._index(i) for i in range(len(self.shards))]
        self._verified = [np.zeros(len(ix), dtype=bool) for ix in self.index]
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def _index(self, i: int) -> np.ndarray:
        shard = self.shards[i]
        idx_path = self.path / shard.get("index", index_path_for(shard["name"]))
        index = load_index(idx_path) if idx_path.is_file() else scan_shard(self.path / shard["name"],
                                                                           self.dtype.itemsize)
        if len(index) != shard["docs"]:
            raise DataError(f"shard {shard['name']} index holds {len(index)} samples, the manifest says {shard['docs']}")
        return index

    # --- the store interface ------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_docs(self) -> int:
        return sum(len(ix) for ix in self.index)

    def lengths(self, shard: int) -> np.ndarray:
        return self.index[shard][:, LENGTH]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def _map(self, shard: int) -> np.memmap:
        m = self._maps.get(shard)
        if m is None:
            path = self.path / self.shards[shard]["name"]
            m = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
            self._maps[shard] = m
            if len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return m

    def bad(self, shard: int, doc: int, reason: str) -> None:
        key = int(self.index[shard][doc, KEY])
        message = f"shard {self.shards[shard]['name']} sample doc-{key:09d}: {reason}"
        if self.on_bad_sample == "error":
            raise DataError(message + ' (set data.on_bad_sample = "skip" to mask it out and count it)')

    def document(self, shard: int, doc: int) -> np.ndarray | None:
        """Token ids of one document (a read-only view), or None for a bad sample in skip mode."""
        offset, length, crc = (int(v) for v in self.index[shard][doc, :3])
        data = self._map(shard)[offset:offset + length * self.dtype.itemsize]
        if len(data) != length * self.dtype.itemsize:
            self.bad(shard, doc, f"truncated ({len(data)} of {length * self.dtype.itemsize} bytes present)")
            return None
        if not self._verified[shard][doc]:
            if zlib.crc32(data) != crc:
                self.bad(shard, doc, "checksum mismatch (corrupt payload)")
                return None
            self._verified[shard][doc] = True
        return data.view(self.dtype)

    def __getstate__(self):  # DataLoader workers reopen their own maps
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state


def open_documents(path: str, split: str, tokenizer_path: str | None = None, on_bad_sample: str = "error"):
    """The store at ``path``: a prepared shard directory, a prepared Megatron directory, or a Megatron prefix."""
    p = Path(path)
    if p.is_dir() and (p / "manifest.json").is_file() and read_manifest(p).get("format") == MEGATRON_FORMAT:
        from pretrain.data.megatron import MegatronDocuments

        return MegatronDocuments.from_prepared(p, split, tokenizer_path)
    if not p.is_dir() and Path(str(p) + ".idx").is_file():
        from pretrain.data.megatron import MegatronDocuments

        return MegatronDocuments(str(p), tokenizer_path=tokenizer_path)
    return ShardDataset(p, split, tokenizer_path=tokenizer_path, on_bad_sample=on_bad_sample)
