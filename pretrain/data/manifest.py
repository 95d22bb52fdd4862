"""A prepared directory's ``manifest.json``: read it (plain JSON) and check what reading the data relies on.
Shared by the shard store (``documents.py``) and the Megatron store (``megatron.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.prepare import DataError
from pretrain.data.tokenizer import Tokenizer


def read_manifest(path: Path) -> dict:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        if path.is_dir() and not any(path.iterdir()):
            raise DataError(f"data dir {path} is empty (make it with tools/prepare_data.py)")
        raise DataError(f"data dir {path} has no manifest.json (make it with tools/prepare_data.py)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path} is not a pretrain-shards manifest (a JSON {type(manifest).__name__})")
    return manifest


def short(digest: str | None) -> str:
    return (digest or "unknown")[:12]


def validate_manifest(path: Path, manifest: dict, tokenizer_path: str | None = None) -> None:
    """A prepared directory's manifest against what reading it relies on: token dtype, vocab size, eos id in
    range, the bundled tokenizer present and equal to ``tokenizer_hash`` — and, when the run names its own
    ``data.tokenizer``, that one too. One DataError line naming the file and the value."""
    where = path / "manifest.json"
    missing = [k for k in ("dtype", "vocab_size", "eos_id", "tokenizer", "tokenizer_hash", "splits") if k not in manifest]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}: re-prepare the data with tools/prepare_data.py")
    limits = {"uint16": 1 << 16, "uint32": 1 << 32}
    if manifest["dtype"] not in limits:
        raise DataError(f"{where}: dtype {manifest['dtype']!r} is not uint16 or uint32")
    vocab, eos = manifest["vocab_size"], manifest["eos_id"]
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 2 <= vocab <= limits[manifest["dtype"]]:
        raise DataError(f"{where}: vocab_size {vocab!r} is not an integer in [2, {limits[manifest['dtype']]}]")
    if not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < vocab:
        raise DataError(f"{where}: eos_id {eos!r} is outside the vocabulary [0, {vocab})")
    own = path / str(manifest["tokenizer"])
    bundled = Tokenizer.load(own) if own.is_file() else None  # reading tokens does not need it; sampling does
    if bundled is not None and (bundled.hash != manifest["tokenizer_hash"] or bundled.vocab_size != vocab):
        raise DataError(f"{own} is not the tokenizer {where} records (tokenizer_hash {short(manifest['tokenizer_hash'])}"
                        f", vocab {vocab}; the file has {short(bundled.hash)}, vocab {bundled.vocab_size})")
    if tokenizer_path:
        configured = Tokenizer.load(tokenizer_path)
        if configured.hash != manifest["tokenizer_hash"]:
            raise DataError(f"data.tokenizer {tokenizer_path} (tokenizer_hash {short(configured.hash)}) is not the one "
                            f"{path} was prepared with ({short(manifest['tokenizer_hash'])})")
