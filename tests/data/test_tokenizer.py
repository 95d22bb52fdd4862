import pytest

from pretrain.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

TEXTS = ["def f(x):\n    return x  # héllo ✓ 中文\n\n\tend  ", "  leading spaces", "\x00odd\r\nbytes", "", "🙂" * 3]


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return Tokenizer.load(prepared / "tokenizer.model")


def test_round_trip(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert (tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id) == (4, 5, 6)
    assert tokenizer.vocab_size == 512
    assert tokenizer.encode("a\nb").count(tokenizer.sp.piece_to_id("\n")) == 1


def test_hash_identifies_the_model(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "copy.model")
    assert Tokenizer.load(tmp_path / "copy.model").hash == tokenizer.hash
    other = train_tokenizer(["some other text entirely " * 50, "with different words, numbers 12345"] * 20, 300)
    assert other.hash != tokenizer.hash


def test_bad_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a sentencepiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(["x"], 100)
