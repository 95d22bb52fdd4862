"""SentencePiece BPE tokenizer: train from an iterator of texts, load, encode / decode, special tokens.

Fixed special ids so every model trained here agrees: pad 0, unk 1, bos 2, eos 3, then ``<mask>``, ``<cls>``,
``<sep>`` and a newline piece. Normalisation is the identity with byte fallback, so ``decode(encode(s)) == s``
for any Unicode text (code keeps its indentation and newlines).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

SPECIAL_PIECES = ("<mask>", "<cls>", "<sep>", "\n")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_proto: bytes, path: str | None = None):
        import sentencepiece as spm

        self.proto = model_proto
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (
            self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
        )
        self.mask_id, self.cls_id, self.sep_id = (self.sp.piece_to_id(p) for p in ("<mask>", "<cls>", "<sep>"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes(), str(path))
        except RuntimeError as exc:
            raise TokenizerError(f"{path} is not a sentencepiece model ({exc})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def hash(self) -> str:
        """sha256 of the serialized model: shards record it so a loader can refuse a different tokenizer."""
        return hashlib.sha256(self.proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.proto)
        tmp.replace(path)


def _lines(texts: Iterable[str], max_lines: int) -> Iterator[str]:
    count = 0
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line
                count += 1
                if count >= max_lines:
                    return


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_lines: int = 2_000_000, threads: int = 0) -> Tokenizer:
    """Train a byte-fallback BPE model on (a prefix of) ``texts``; newlines become the ``\\n`` piece."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise TokenizerError(f"vocab size {vocab_size} is too small: byte fallback alone needs 256 + 8 pieces")
    buffer = io.BytesIO()
    stopped: list[BaseException] = []

    def feed():  # sentencepiece ends its input quietly on an exception from the iterator: remember it
        try:
            yield from _lines(texts, max_lines)
        except BaseException as exc:
            stopped.append(exc)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=feed(),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type="bpe",
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            user_defined_symbols=list(SPECIAL_PIECES),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 14,
            input_sentence_size=max_lines,
            shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            num_threads=threads or max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as exc:
        if stopped:
            raise stopped[0] from None
        raise TokenizerError(f"tokenizer training failed: {exc}") from None
    if stopped:  # Ctrl-C / SIGTERM / a bad document while reading: not a tokenizer of part of the corpus
        raise stopped[0]
    return Tokenizer(buffer.getvalue())
