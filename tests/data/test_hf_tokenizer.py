"""Data prepared with a Hugging Face model's own tokenizer (tokenizer.json): what continuing to pretrain Llama 3 /
Qwen needs. The shards hold that tokenizer's ids, documents end in its end-of-text token, training reads them and
the HF export ships the same tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.data.tokenizer import Tokenizer, TokenizerError

tokenizers = pytest.importorskip("tokenizers")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, small_corpus):
    """A byte-level BPE like Llama 3's / Qwen's, trained here on the small corpus, with its tokenizer_config.json."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    fast = Fast(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fast.train([str(p) for p in sorted(small_corpus.iterdir())], trainer)
    out = tmp_path_factory.mktemp("hf_tok")
    fast.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                           "eos_token": {"content": "<|end_of_text|>"}}))
    return out


def test_prepare_with_an_hf_tokenizer_keeps_its_ids_and_end_of_text(tmp_path, small_corpus, hf_tokenizer_dir):
    from pretrain.data.documents import ShardDataset
    from pretrain.data.prepare import prepare

    manifest = prepare([str(small_corpus)], tmp_path / "ds", tokenizer=str(hf_tokenizer_dir), val_fraction=0.1,
                       progress=False)
    tok = Tokenizer.load(hf_tokenizer_dir)
    assert manifest["tokenizer"] == "tokenizer.json" and manifest["eos_id"] == tok.eos_id == 1
    assert manifest["vocab_size"] == tok.vocab_size and manifest["tokenizer_hash"] == tok.hash
    store = ShardDataset(tmp_path / "ds", "train")
    first = store.document(0, 0)
    text = tok.decode(first[:-1] if store.append_eos else first)
    assert text and tok.encode(text) == list(first[:len(tok.encode(text))])
    assert Tokenizer.load(tmp_path / "ds" / "tokenizer.json").hash == tok.hash  # bundled with its config


def test_train_on_it_and_export_ships_the_same_tokenizer(tmp_path, small_corpus, hf_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from pretrain.data.prepare import prepare

    prepare([str(small_corpus)], tmp_path / "ds", tokenizer=str(hf_tokenizer_dir), val_fraction=0.1, progress=False)
    run = tmp_path / "run"
    common = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.vocab_size=512", "model.seq_len=16",
              "train.micro_batch_size=2", "train.steps=2", "schedule.warmup_steps=1", "logging.tensorboard=false",
              "data.source=shards", f"data.path={tmp_path / 'ds'}", "checkpoint.hf_at_end=true",
              f"logging.run_dir={run}"]
    done = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *common], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = transformers.AutoTokenizer.from_pretrained(run / "hf" / "step-00000002")
    ours = Tokenizer.load(hf_tokenizer_dir)
    text = "def add(a, b):\n    return a + b\n"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.eos_token == "<|end_of_text|>"


def test_an_hf_tokenizer_without_an_end_of_text_token_is_one_line(tmp_path, small_corpus, hf_tokenizer_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        Tokenizer.load(bare)
    (bare / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="is not a Hugging Face tokenizer"):
        Tokenizer.load(bare / "tokenizer.json")
    done = subprocess.run([sys.executable, "tools/prepare_data.py", "--input", str(small_corpus), "--output",
                           str(tmp_path / "out"), "--tokenizer", str(bare), "--quiet"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "is not a Hugging Face tokenizer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
