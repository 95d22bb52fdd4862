import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.prepare import DataError, prepare
from pretrain.data.stream import PackedStream, ShardDataset
from pretrain.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def corpus_tokens(source_dir: Path, tokenizer: Tokenizer, every: int) -> dict[str, list[list[int]]]:
    """What the shards must hold: each file's tokens, in sorted-path order, split by index."""
    docs = [tokenizer.encode(p.read_bytes().decode("utf-8", errors="replace")) for p in sorted(source_dir.iterdir())]
    docs = [d for d in docs if d]
    return {"train": [d for i, d in enumerate(docs) if i % every != every - 1],
            "val": [d for i, d in enumerate(docs) if i % every == every - 1]}


def test_unshuffled_stream_is_the_corpus_in_order(prepared, small_corpus):
    tok = Tokenizer.load(prepared / "tokenizer.model")
    expected_docs = corpus_tokens(small_corpus, tok, every=10)["train"]
    expected = np.concatenate([np.append(d, tok.eos_id) for d in expected_docs])
    dataset = ShardDataset(prepared, "train")
    assert dataset.num_docs == len(expected_docs) and len(dataset.shards) > 1
    seq_len, batch = 64, 4
    stream = PackedStream(dataset, seq_len, batch, shuffle=False, loop=False)
    got = []
    try:
        while True:
            b = stream.next_batch()
            torch.testing.assert_close(b["tokens"][:, 1:], b["targets"][:, :-1])
            got.extend(b["tokens"].reshape(-1).tolist())
    except StopIteration:
        pass
    n = len(got)
    assert n >= len(expected) - (batch + 1) * seq_len
    assert got == expected[:n].tolist()


def test_shuffled_epoch_is_a_permutation_of_documents(prepared):
    dataset = ShardDataset(prepared, "train")
    stream = PackedStream(dataset, 16, 1, shuffle=True, seed=3)
    unshuffled = [tuple(stream.order.dataset.read_shard(i)[j]) for i in range(len(dataset.shards))
                  for j in range(dataset.doc_counts[i])]
    epoch0 = [tuple(stream.order.document(i)) for i in range(len(stream.order))]
    assert sorted(epoch0) == sorted(unshuffled) and epoch0 != unshuffled
    stream.load_state_dict({"epoch": 1, "doc": 0, "offset": 0, "sequence": 0})
    epoch1 = [tuple(stream.order.document(i)) for i in range(len(stream.order))]
    assert sorted(epoch1) == sorted(unshuffled) and epoch1 != epoch0


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, small_corpus, prepared):
    """30 short documents in ~6 shards: a few batches cross shard and epoch boundaries."""
    src = tmp_path_factory.mktemp("short")
    for i, path in enumerate(sorted(small_corpus.iterdir())[:30]):
        (src / f"{i:02d}.txt").write_text(path.read_text(errors="replace")[: 150 + 37 * i])
    out = tmp_path_factory.mktemp("short_shards") / "ds"
    prepare([str(src)], out, tokenizer=str(prepared / "tokenizer.model"), val_fraction=0.0, shard_tokens=500,
            progress=False)
    return out


@pytest.mark.parametrize("mode", ["gpt", "bert"])
def test_resume_mid_stream_is_exact(small_shards, mode):
    dataset = ShardDataset(small_shards, "train")
    assert len(dataset.shards) >= 4
    straight = PackedStream(dataset, 48, 3, shuffle=True, seed=5, mode=mode)
    batches = [straight.next_batch() for _ in range(150)]  # crosses shard and epoch boundaries
    assert straight.state_dict()["epoch"] >= 1
    for k in (1, 17, 41, 97, 140):
        probe = PackedStream(dataset, 48, 3, shuffle=True, seed=5, mode=mode)
        for _ in range(k):
            probe.next_batch()
        state = json.loads(json.dumps(probe.state_dict()))  # survives the checkpoint's JSON
        resumed = PackedStream(dataset, 48, 3, shuffle=True, seed=5, mode=mode)
        resumed.load_state_dict(state)
        for expected in batches[k:k + 5]:
            got = resumed.next_batch()
            for key in expected:
                assert torch.equal(got[key], expected[key]), (k, key)


def test_ranks_split_the_global_stream(prepared):
    dataset = ShardDataset(prepared, "train")
    single = PackedStream(dataset, 32, 4, shuffle=True, seed=1)
    ranks = [PackedStream(dataset, 32, 2, shuffle=True, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()["tokens"]
        parts = [r.next_batch()["tokens"] for r in ranks]
        interleaved = torch.stack([parts[0][0], parts[1][0], parts[0][1], parts[1][1]])
        assert torch.equal(whole, interleaved)


def test_bert_batches(prepared):
    tok = Tokenizer.load(prepared / "tokenizer.model")
    stream = PackedStream(ShardDataset(prepared, "train"), 64, 8, shuffle=False, mode="bert")
    b = stream.next_batch()
    assert (b["tokens"][:, 0] == tok.cls_id).all()
    masked = b["labels"] != -100
    assert masked.any() and not masked[~b["attention_mask"]].any()
    assert (b["labels"][masked] != tok.cls_id).all()
    lengths = b["attention_mask"].sum(1)
    assert all(b["tokens"][i, lengths[i] - 1] == tok.sep_id for i in range(8))


def test_mlm_masking_statistics():
    from pretrain.data.mlm import mask_tokens

    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 1000, size=200_000)
    valid = np.ones_like(tokens, dtype=bool)
    out, labels = mask_tokens(tokens, valid, rng, 4, 1000, 0.15, [0, 1, 2, 3, 4, 5, 6])
    picked = labels != -100
    assert abs(picked.mean() - 0.15) < 0.005
    assert np.array_equal(labels[picked], tokens[picked])
    assert abs((out[picked] == 4).mean() - 0.8) < 0.01
    assert abs((out[picked] == tokens[picked]).mean() - 0.1) < 0.01
    assert (out[~picked] == tokens[~picked]).all()


def test_output_identical_for_any_worker_count(small_corpus, prepared, tmp_path):
    tok = str(prepared / "tokenizer.model")
    prepare([str(small_corpus)], tmp_path / "w2", tokenizer=tok, val_fraction=0.1, shard_tokens=20_000, workers=2,
            progress=False)
    for name in json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["shards"]:
        assert (tmp_path / "w2" / name["name"]).read_bytes() == (prepared / name["name"]).read_bytes()


def test_webdataset_reads_our_shards(prepared):
    wds = pytest.importorskip("webdataset")
    dataset = ShardDataset(prepared, "train")
    first = dataset.read_shard(0)
    samples = list(wds.WebDataset(str(prepared / dataset.shards[0]["name"]), shardshuffle=False))
    assert len(samples) == len(first)
    assert np.array_equal(np.frombuffer(samples[0]["tokens"], dtype="<u2"), first[0])
    assert json.loads(samples[0]["json"])["tokens"] == len(first[0])


def test_inputs_jsonl_gz_bad_bytes_and_empty(tmp_path, prepared):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"caf\xe9 \xff\xfe broken latin-1 \xef\xbf\xbd real replacement char")
    (src / "b.jsonl").write_text(json.dumps({"content": "first record"}) + "\n\n" + json.dumps({"content": ""}) + "\n"
                                 + json.dumps({"content": "third"}) + "\n")
    with gzip.open(src / "c.txt.gz", "wt") as f:
        f.write("gzipped document")
    manifest = prepare([str(src)], tmp_path / "out", tokenizer=str(prepared / "tokenizer.model"), jsonl_field="content",
                       val_fraction=0.0, progress=False)
    assert manifest["stats"]["replaced_chars"] == 3  # \xe9, \xff, \xfe; the literal U+FFFD is not counted
    assert manifest["stats"]["docs"] == 5 and manifest["stats"]["empty_docs"] == 1
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.model")
    docs = ShardDataset(tmp_path / "out").read_shard(0)
    assert [tok.decode(d) for d in docs][1:] == ["first record", "third", "gzipped document"]


def test_bad_inputs(tmp_path, prepared, small_corpus):
    tok = str(prepared / "tokenizer.model")
    with pytest.raises(DataError, match="input not found"):
        prepare([str(tmp_path / "nope")], tmp_path / "o1", tokenizer=tok, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    with pytest.raises(DataError, match="corpus yields zero tokens"):
        prepare([str(empty)], tmp_path / "o2", tokenizer=tok, progress=False)
    assert not (tmp_path / "o2").exists()  # nothing half-written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([str(bad)], tmp_path / "o3", tokenizer=tok, progress=False)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty"):
        prepare([str(small_corpus)], keep, tokenizer=tok, progress=False)
    assert (keep / "precious.txt").read_text() == "mine"


def test_stream_bad_inputs(tmp_path, prepared):
    with pytest.raises(DataError, match="does not exist"):
        ShardDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        ShardDataset(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in prepared.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="shard train-000001.tar is listed in .* but missing"):
        ShardDataset(broken)


def test_cli_prepare_and_vocab_check(tmp_path, small_corpus):
    out = tmp_path / "ds"
    cmd = [sys.executable, "tools/prepare_data.py", "--input", str(small_corpus), "--output", str(out),
           "--vocab-size", "600", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 600
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: output") \
        and len(again.stderr.strip().splitlines()) == 1
    train = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", "data.source=shards",
                            f"data.path={out}", "model.vocab_size=512", f"logging.run_dir={tmp_path / 'run'}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert train.returncode == 2
    assert train.stderr.strip() == f"error: tokenizer vocab (600) of {out} is larger than model.vocab_size (512)"
