"""Corpus -> tokenized webdataset shards + ``manifest.json``.

Inputs: text files (one file = one document), ``.jsonl`` (one record = one document, text in a configurable
field), either gzipped (``.gz``), directories (recursive, sorted), globs, or ``builtin`` — the running
Python's own standard library ``.py`` files, sorted (present on every machine, no download).

Output ``DIR/``: ``train-000000.tar`` … and ``val-000000.tar`` … (webdataset layout: each sample is
``doc-NNNNNNNNN.tokens``, the token ids as little-endian uint16, or uint32 when the vocab exceeds 65535, plus
``doc-NNNNNNNNN.json`` metadata) with an index ``train-000000.idx`` beside each tar (byte offset, token count,
CRC-32 and number of every document: the loader seeks straight to any document), ``tokenizer.model``, and
``manifest.json`` written last. ``fmt="megatron"`` writes ``train.bin/.idx`` and ``val.bin/.idx`` with
megatron-core's ``IndexedDatasetBuilder`` instead (EOS appended to each document, as its ``--append-eod``). Everything is built
in a temporary sibling directory and renamed into place, so an interrupted run never leaves a half dataset
and an existing one is replaced only with ``overwrite=True``.

Documents are encoded a bounded window of 1 MB chunks at a time — by one thread per core in one process
(``workers=1``; sentencepiece releases the GIL, reading and writing overlap), or by N worker processes — results
kept in input order, so the output is identical for any N.
A document goes to the validation split when its index is ``every - 1`` modulo ``every = round(1/val_fraction)``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.data.tokenizer import Tokenizer, tokenizer_from_bytes, train_tokenizer
from pretrain.errors import DataError  # re-exported: raised here, defined with the other user errors
from pretrain.files import check_output, replace_dir

MANIFEST_FORMAT = "pretrain-shards"
MEGATRON_FORMAT = "pretrain-megatron"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text", ".jsonl", ".json")




@dataclass
class Document:
    source: str
    text: str
    replaced: int = 0  # undecodable bytes replaced by U+FFFD
    size: int = 0  # bytes read for it


@dataclass
class PrepareStats:
    docs: int = 0
    empty_docs: int = 0
    replaced_chars: int = 0
    bytes: int = 0
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})


def builtin_corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item == "builtin":
            files.extend(builtin_corpus_files())
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
            if not found:
                raise DataError(f"input directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)}, .gz)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise DataError(f"input pattern {item!r} matches no files")
            files.extend(matched)
        else:
            raise DataError(f"input not found: {item}")
    return files


def _inner_name(path: Path) -> str:
    """The file name without a trailing .gz: what the content is."""
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def _is_text_file(path: Path) -> bool:
    return _inner_name(path).endswith(TEXT_SUFFIXES)


def _decode(data: bytes) -> tuple[str, int]:
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.count("\ufffd".encode())
    return text, replaced


def iter_documents(files: list[Path], jsonl_field: str = "text") -> Iterator[Document]:
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                if _inner_name(path).endswith(".jsonl"):
                    for lineno, raw in enumerate(f, 1):
                        if not raw.strip():
                            continue
                        line, replaced = _decode(raw)
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                        if not isinstance(record, dict) or jsonl_field not in record:
                            raise DataError(f"{path}:{lineno}: record has no field {jsonl_field!r} (set --jsonl-field)")
                        text = record[jsonl_field]
                        if not isinstance(text, str):  # never tokenize a repr of null / 3 / [..]
                            raise DataError(f"{path}:{lineno}: field {jsonl_field!r} is {json.dumps(text)[:40]} "
                                            f"({type(text).__name__}), not a string")
                        yield Document(f"{path}:{lineno}", text, replaced, len(raw))
                else:
                    data = f.read()
                    text, replaced = _decode(data)
                    yield Document(str(path), text, replaced, len(data))
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None


# Worker side: the tokenizer is loaded once per process; each chunk is encoded on one sentencepiece thread
# (which runs without the GIL): one thread per core in the single-process mode, one per worker process otherwise.
_WORKER: list = []


def _init_worker(proto: bytes, dtype: str, threads: int) -> None:
    _WORKER[:] = [tokenizer_from_bytes(proto), np.dtype(dtype), threads]


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    tok, dtype, threads = _WORKER
    return [np.asarray(ids, dtype=dtype) for ids in tok.encode_many(texts, threads)]


def _chunks(docs: Iterator[Document], chunk_bytes: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def index_path_for(tar_name: str) -> str:
    return tar_name[:-4] + ".idx" if tar_name.endswith(".tar") else tar_name + ".idx"


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header ``tarfile`` writes for a regular file (mode 644, uid/gid 0, mtime 0), built
    directly: tarfile's own header code was an eighth of the whole prepare time."""
    raw = name.encode()
    if len(raw) > 100 or size >= 8 ** 11:
        raise DataError(f"sample {name} ({size} bytes) does not fit a USTAR header")
    h = bytearray(512)
    h[0:len(raw)] = raw
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"  # mode, uid, gid
    h[124:136], h[136:148] = b"%011o\0" % size, b"00000000000\0"  # size, mtime
    h[148:156], h[156:157], h[257:265] = b"        ", b"0", b"ustar\x0000"  # checksum blank, regular file, magic
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class ShardWriter:
    """Appends documents to ``{split}-NNNNNN.tar`` files (byte for byte what ``tarfile`` would write), starting
    a new shard past ``shard_tokens``; writes each shard's ``.idx`` when the shard is closed."""

    RECORD = 20 * 512  # tar files end padded to a whole record

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, eos_id: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.offset = 0
        self.rows: list[tuple[int, int, int, int]] = []

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.file = open(self.out_dir / name, "wb")
        self.offset = 0
        self.shards.append({"name": name, "index": index_path_for(name), "docs": 0, "tokens": 0})
        self.rows = []

    def _add(self, name: str, payload: bytes) -> int:
        """Append one member; returns the byte offset of its payload in the tar."""
        pad = -len(payload) % 512
        self.file.write(ustar_header(name, len(payload)) + payload + bytes(pad))
        offset = self.offset + 512
        self.offset = offset + len(payload) + pad
        return offset

    def write(self, index: int, tokens, source: str) -> None:
        if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self._open()
        key = f"doc-{index:09d}"
        payload = np.asarray(tokens, dtype=self.dtype).tobytes()
        offset = self._add(f"{key}.tokens", payload)
        self.rows.append((offset, len(tokens), zlib.crc32(payload), index))
        self._add(f"{key}.json", json.dumps({"source": source, "tokens": len(tokens)}).encode())
        self.shards[-1]["docs"] += 1
        self.shards[-1]["tokens"] += len(tokens)

    def close(self) -> None:
        if self.file is not None:
            end = self.offset + 1024  # two zero blocks end the archive
            self.file.write(bytes(1024 + (-end % self.RECORD)))
            self.file.close()
            self.file = None
            shard = self.shards[-1]
            shard["bytes"] = (self.out_dir / shard["name"]).stat().st_size
            with open(self.out_dir / shard["index"], "wb") as f:
                np.save(f, np.array(self.rows, dtype=np.int64).reshape(-1, 4), allow_pickle=False)

    def summary(self) -> dict:
        return {"docs": sum(s["docs"] for s in self.shards), "shards": self.shards}


class MegatronWriter:
    """One ``{split}.bin/.idx`` pair through megatron-core's ``IndexedDatasetBuilder`` (extra ``megatron``);
    each document is one sequence, EOS appended."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, eos_id: int):
        try:
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
        except ImportError:
            raise DataError("--format megatron needs megatron-core: pip install -e '.[megatron]'") from None
        import torch

        self.torch, self.out_dir, self.split, self.eos_id = torch, out_dir, split, eos_id
        self.np_dtype = np.uint16 if dtype.itemsize == 2 else np.int32
        self.builder = IndexedDatasetBuilder(str(out_dir / f"{split}.bin"), dtype=self.np_dtype)
        self.docs = 0

    def write(self, index: int, tokens, source: str) -> None:
        self.builder.add_item(self.torch.from_numpy(np.append(np.asarray(tokens, dtype=np.int64), self.eos_id)))
        self.builder.end_document()
        self.docs += 1

    def close(self) -> None:
        if self.builder is not None:
            self.builder.finalize(str(self.out_dir / f"{self.split}.idx"))
            self.builder = None

    def summary(self) -> dict:
        return {"docs": self.docs, "prefix": self.split}


class Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.start, self.last = enabled, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, stats: PrepareStats, final: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 5.0)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        tokens = sum(stats.tokens.values())
        line = (f"prepare: {stats.docs} docs, {tokens / 1e6:.2f} M tokens, {stats.bytes / 1e6:.1f} MB, "
                f"{stats.bytes / 1e6 / elapsed:.1f} MB/s, {tokens / elapsed / 1e6:.2f} M tok/s")
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def prepare(
    inputs: list[str],
    output: str | os.PathLike,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    jsonl_field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 1 << 24,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    fmt: str = "shards",
    stopped=None,
) -> dict:
    """Build shards + manifest in ``output``; returns the manifest. Raises DataError with one clear line.
    ``stopped()`` (optional) is asked before the output is put in place: a signal that a library swallowed
    (sentencepiece catches exceptions raised in its callbacks) still stops the run with nothing written."""
    out = Path(output)
    sources = [p for p in inputs if p != "builtin"] + ([tokenizer] if tokenizer else [])
    check_output(out, sources, overwrite, "prepared data set", is_prepared_dir, DataError)
    if not 0.0 <= val_fraction < 0.5:
        raise DataError(f"val fraction must be in [0, 0.5), got {val_fraction}")
    if shard_tokens <= 0 or workers <= 0:
        raise DataError("shard tokens and workers must be positive")
    if fmt not in WRITERS:
        raise DataError(f"format must be one of {', '.join(WRITERS)}, got {fmt!r}")
    files = expand_inputs(inputs)
    if not files:
        raise DataError("no input files")

    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    else:
        tok = train_tokenizer((d.text for d in iter_documents(files, jsonl_field)), vocab_size)
    dtype = np.dtype("<u2") if tok.vocab_size <= 65535 else np.dtype("<u4")

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write_shards(files, tok, tmp, dtype, jsonl_field, val_fraction, shard_tokens, workers, progress,
                                 inputs, fmt)
        if stopped is not None and stopped():
            raise KeyboardInterrupt
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def remove_orphans(out: Path) -> None:
    """Remove ``.NAME.tmp-PID`` directories beside ``out`` whose process is gone (a prepare killed by SIGKILL)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not tmp.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
            sys.stderr.write(f"prepare: removed {tmp}, left by an interrupted run (pid {pid})\n")
        except PermissionError:
            pass  # alive, someone else's


WRITERS = {"shards": (ShardWriter, MANIFEST_FORMAT), "megatron": (MegatronWriter, MEGATRON_FORMAT)}


def is_prepared_dir(path: Path) -> bool:
    """Whether ``path`` holds what :func:`prepare` writes (its manifest says so): the only thing
    ``--overwrite`` may replace."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") in (MANIFEST_FORMAT, MEGATRON_FORMAT)


def _write_shards(files, tok, tmp, dtype, jsonl_field, val_fraction, shard_tokens, workers, progress, inputs,
                  fmt="shards") -> dict:
    stats = PrepareStats()
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    writer_cls, manifest_format = WRITERS[fmt]
    writers = {split: writer_cls(tmp, split, dtype, shard_tokens, tok.eos_id) for split in ("train", "val")}
    bar = Progress(progress)
    docs = iter_documents(files, jsonl_field)
    pool = encoder = None  # a signal may come before either exists
    if workers > 1:
        pool = mp.get_context("spawn").Pool(workers, _init_worker, (tok.proto, dtype.str, 1))
    try:
        chunks = _chunks(docs, 1 << 20)
        if pool is None:
            # one chunk per core at a time, each on one sentencepiece thread (it releases the GIL), while this
            # thread reads and writes the others
            threads = os.cpu_count() or 1
            _init_worker(tok.proto, dtype.str, 1)
            encoder = ThreadPoolExecutor(threads)
            encoded = _encode_pipelined(lambda fn, args: encoder.submit(fn, *args), chunks, window=2 * threads)
        else:
            encoded = _encode_pipelined(pool.apply_async, chunks, window=2 * workers)
        index = 0
        for chunk, ids_list in encoded:
            for doc, ids in zip(chunk, ids_list):
                stats.docs += 1
                stats.bytes += doc.size
                stats.replaced_chars += doc.replaced
                if len(ids) == 0:
                    stats.empty_docs += 1
                    continue
                split = "val" if every and index % every == every - 1 else "train"
                writers[split].write(index, ids, doc.source)
                stats.tokens[split] += len(ids)
                index += 1
            bar.update(stats)
    finally:
        if pool is not None:
            pool.terminate()
        if encoder is not None:
            encoder.shutdown(cancel_futures=True)
        for w in writers.values():
            w.close()
    bar.update(stats, final=True)
    if stats.tokens["train"] == 0:
        raise DataError(f"corpus yields zero tokens ({stats.docs} documents, {stats.empty_docs} empty): {' '.join(inputs)}")
    if stats.replaced_chars:
        sys.stderr.write(f"prepare: warning: {stats.replaced_chars} undecodable bytes replaced by U+FFFD\n")
    tok.save(tmp / tok.file_name)
    manifest = {
        "format": manifest_format,
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tok.file_name,
        "tokenizer_hash": tok.hash,
        "splits": {
            split: {**w.summary(), "tokens": stats.tokens[split]} for split, w in writers.items()
        },
        "stats": {"docs": stats.docs, "empty_docs": stats.empty_docs, "replaced_chars": stats.replaced_chars,
                  "bytes": stats.bytes},
        "inputs": [str(i) for i in inputs],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _encode_pipelined(submit, chunks, window: int):
    """Keep ``window`` chunks being encoded (a thread or a process pool); yield them in input order, so the
    output does not depend on the worker count, and memory stays bounded."""
    def finished(item):
        chunk, job = item  # a thread's Future or a pool's AsyncResult
        return chunk, job.result() if hasattr(job, "result") else job.get()

    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append((chunk, submit(_encode_chunk, ([d.text for d in chunk],))))
        if len(pending) >= window:
            yield finished(pending.popleft())
    while pending:
        yield finished(pending.popleft())
