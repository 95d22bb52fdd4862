"""Tokenizers: our SentencePiece BPE (train, load, encode / decode) and, to continue pretraining a Hugging Face
model on its own tokenization, that model's fast tokenizer (``tokenizer.json``: Llama 3, Qwen2 / 3, Mistral).

SentencePiece models trained here share fixed special ids: pad 0, unk 1, bos 2, eos 3, then ``<mask>``, ``<cls>``,
``<sep>`` and a newline piece. Normalisation is the identity with byte fallback, so ``decode(encode(s)) == s``
for any Unicode text (code keeps its indentation and newlines). A Hugging Face tokenizer keeps its own ids; its
end-of-text token (what separates documents) comes from the ``tokenizer_config.json`` beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pretrain.errors import TokenizerError  # re-exported: raised here, defined with the other user errors

SPECIAL_PIECES = ("<mask>", "<cls>", "<sep>", "\n")




class Tokenizer:
    file_name = "tokenizer.model"  # what a prepared data set calls it

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
    def load(cls, path: str | os.PathLike) -> Tokenizer | HFTokenizer:
        """A sentencepiece model file, or a Hugging Face ``tokenizer.json`` (or a model directory holding one)."""
        path = Path(path)
        if path.is_dir() and (path / HFTokenizer.file_name).is_file():
            return HFTokenizer.load(path / HFTokenizer.file_name)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model not found: {path}")
        if path.suffix == ".json":
            return HFTokenizer.load(path)
        try:
            return cls(path.read_bytes(), str(path))
        except RuntimeError as exc:
            raise TokenizerError(f"{path} is not a sentencepiece model ({exc})") from None

    def encode_many(self, texts: list[str], threads: int) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

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


def tokenizer_from_bytes(data: bytes) -> Tokenizer | HFTokenizer:
    """What ``.proto`` of either kind rebuilds (prepare's worker processes)."""
    return HFTokenizer(data) if data.lstrip()[:1] == b"{" else Tokenizer(data)


class HFTokenizer:
    """A Hugging Face fast tokenizer with the interface of :class:`Tokenizer` (ids as the model was trained with).
    ``specials``: token names for bos / eos / pad / unk as ``tokenizer_config.json`` gives them."""

    file_name = "tokenizer.json"

    def __init__(self, data: bytes, path: str | None = None, specials: dict | None = None):
        try:
            from tokenizers import Tokenizer as Fast
        except ImportError:
            raise TokenizerError("a Hugging Face tokenizer.json needs the tokenizers package: "
                                 "pip install -e '.[hf]'") from None
        self.proto, self.path, self.specials = data, path, dict(specials or {})
        try:
            self.fast = Fast.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own Exception type for malformed JSON
            raise TokenizerError(f"{path or 'tokenizer.json'} is not a Hugging Face tokenizer ({exc})") from None
        ids = {k: self.fast.token_to_id(v) if v else None for k, v in self.specials.items()}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids.get(k) for k in ("bos", "eos", "pad", "unk"))
        self.mask_id = self.cls_id = self.sep_id = None  # BERT pieces: our sentencepiece models only

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer not found: {path}")
        specials = {}
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            try:
                raw = json.loads(config.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TokenizerError(f"{config} is not valid JSON ({exc})") from None
            for key in ("bos", "eos", "pad", "unk"):
                token = raw.get(f"{key}_token") if isinstance(raw, dict) else None
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str):
                    specials[key] = token
        tok = cls(path.read_bytes(), str(path), specials)
        if tok.eos_id is None:
            raise TokenizerError(f"{path}: no end-of-text token (eos_token in a tokenizer_config.json beside it, "
                                 "naming a token of this tokenizer): documents could not be separated")
        return tok

    @property
    def vocab_size(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.fast.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.fast.encode_batch(texts, add_special_tokens=False)]

    def encode_many(self, texts: list[str], threads: int) -> list[list[int]]:
        return self.encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.fast.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """``tokenizer.json`` as read, and its special tokens in ``tokenizer_config.json`` beside it."""
        path = Path(path)
        for target, data in ((path, self.proto),
                             (path.with_name("tokenizer_config.json"),
                              json.dumps({f"{k}_token": v for k, v in self.specials.items()}, indent=1).encode())):
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)


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
