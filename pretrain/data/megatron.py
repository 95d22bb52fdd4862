"""Megatron ``.bin/.idx`` datasets read through megatron-core's ``IndexedDataset`` (extra ``megatron``).

Each Megatron sequence is one document, as Megatron's GPTDataset treats them. No EOS is added when packing: the
data holds whatever end-of-document token it was written with (``preprocess_data.py --append-eod``; our
``prepare --format megatron`` appends EOS). A dataset with zero tokens is refused here, before anything can
loop on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.data.manifest import read_manifest, validate_manifest
from pretrain.data.prepare import DataError
from pretrain.data.tokenizer import Tokenizer


def _indexed_dataset(prefix: str):
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError:
        raise DataError("Megatron datasets need megatron-core: pip install -e '.[megatron]'") from None
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"Megatron dataset {prefix}: {prefix + suffix} is missing")
    if Path(prefix + ".bin").stat().st_size == 0:  # megatron-core cannot even map it; its GPTDataset would spin
        raise DataError(f"Megatron dataset {prefix} holds zero tokens")
    try:
        return IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as exc:
        raise DataError(f"Megatron dataset {prefix} is unreadable: {exc or type(exc).__name__}") from None


class MegatronDocuments:
    """One Megatron prefix as a single-shard document store."""

    append_eos = False
    on_bad_sample = "error"

    def __init__(self, prefix: str, tokenizer_path: str | None = None, vocab_size: int | None = None,
                 eos_id: int | None = None):
        self.prefix = prefix
        self.dataset = _indexed_dataset(prefix)
        self._lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        if int(self._lengths.sum()) == 0:
            raise DataError(f"Megatron dataset {prefix} holds zero tokens")
        self.tokenizer_path = tokenizer_path
        tok = Tokenizer.load(tokenizer_path) if tokenizer_path else None
        self.tokenizer_hash = tok.hash if tok else None
        self.vocab_size = vocab_size if vocab_size is not None else (tok.vocab_size if tok else None)
        self.eos_id = eos_id if eos_id is not None else (tok.eos_id if tok else None)

    @classmethod
    def from_prepared(cls, path: Path, split: str, tokenizer_path: str | None = None) -> MegatronDocuments:
        manifest = read_manifest(path)
        validate_manifest(path, manifest, tokenizer_path)
        if split not in manifest["splits"] or manifest["splits"][split]["tokens"] == 0:
            raise DataError(f"the {split} split of {path} holds zero tokens")
        own = path / manifest["tokenizer"]
        store = cls(str(path / manifest["splits"][split]["prefix"]), str(own), manifest["vocab_size"],
                    manifest["eos_id"])
        store.tokenizer_hash = manifest["tokenizer_hash"]
        return store

    @property
    def num_shards(self) -> int:
        return 1

    def lengths(self, shard: int) -> np.ndarray:
        return self._lengths

    def tokenizer(self) -> Tokenizer:
        if not self.tokenizer_path:
            raise DataError(f"Megatron dataset {self.prefix} has no tokenizer: set data.tokenizer")
        return Tokenizer.load(self.tokenizer_path)

    def document(self, shard: int, doc: int) -> np.ndarray:
        return self.dataset.get(int(doc))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["dataset"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.dataset = _indexed_dataset(self.prefix)
