import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.data.documents import ShardDataset
from pretrain.data.prepare import DataError, prepare
from pretrain.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def corpus_tokens(source_dir: Path, tokenizer: Tokenizer, every: int) -> dict[str, list[list[int]]]:
    """What the shards must hold: each file's tokens, in sorted-path order, split by index."""
    docs = [tokenizer.encode(p.read_bytes().decode("utf-8", errors="replace")) for p in sorted(source_dir.iterdir())]
    docs = [d for d in docs if d]
    return {"train": [d for i, d in enumerate(docs) if i % every != every - 1],
            "val": [d for i, d in enumerate(docs) if i % every == every - 1]}


def all_docs(ds) -> list[np.ndarray]:
    return [ds.document(s, d) for s in range(ds.num_shards) for d in range(len(ds.lengths(s)))]


def test_shards_hold_the_corpus_and_the_index_matches_the_tar(prepared, small_corpus):
    tok = Tokenizer.load(prepared / "tokenizer.model")
    expected = corpus_tokens(small_corpus, tok, every=10)
    for split in ("train", "val"):
        ds = ShardDataset(prepared, split)
        assert [d.tolist() for d in all_docs(ds)] == expected[split]
    ds = ShardDataset(prepared, "train")
    assert ds.num_shards > 1
    # the prepare-time index equals one rebuilt by walking the tar
    from pretrain.data.documents import scan_shard

    for s in range(ds.num_shards):
        assert np.array_equal(ds.index[s], scan_shard(prepared / ds.shards[s]["name"], 2))


def test_large_vocab_writes_uint32(tmp_path):
    from pretrain.data.prepare import ShardWriter

    w = ShardWriter(tmp_path, "train", np.dtype("<u4"), 100, eos_id=3)
    w.write(0, [70000, 5, 123456], "x")
    w.close()
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "pretrain-shards", "dtype": "uint32", "vocab_size": 200000, "eos_id": 3,
        "tokenizer": "t.model", "tokenizer_hash": "", "splits": {"train": {**w.summary(), "tokens": 3}}}))
    assert ShardDataset(tmp_path).document(0, 0).tolist() == [70000, 5, 123456]


def test_output_identical_for_any_worker_count(small_corpus, prepared, tmp_path):
    tok = str(prepared / "tokenizer.model")
    prepare([str(small_corpus)], tmp_path / "w2", tokenizer=tok, val_fraction=0.1, shard_tokens=20_000, workers=2,
            progress=False)
    for name in json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["shards"]:
        assert (tmp_path / "w2" / name["name"]).read_bytes() == (prepared / name["name"]).read_bytes()


def test_webdataset_reads_our_shards(prepared):
    wds = pytest.importorskip("webdataset")
    dataset = ShardDataset(prepared, "train")
    first = [dataset.document(0, d) for d in range(len(dataset.lengths(0)))]
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
    docs = all_docs(ShardDataset(tmp_path / "out"))
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
    for overwrite in (False, True):  # not a prepared data set: never replaced
        with pytest.raises(DataError, match="holds files that are not an earlier prepared data set"):
            prepare([str(small_corpus)], keep, tokenizer=tok, progress=False, overwrite=overwrite)
    assert (keep / "precious.txt").read_text() == "mine"


def test_stream_bad_inputs(tmp_path, prepared, small_corpus):
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
    from pretrain.data.tokenizer import train_tokenizer

    other = train_tokenizer((p.read_text(errors="replace") for p in sorted(small_corpus.iterdir())[:5]), 400)
    other.save(tmp_path / "other.model")
    with pytest.raises(DataError, match=r"data.tokenizer .*other.model \(tokenizer_hash \w{12}\) is not the one .* was prepared with \(\w{12}\)"):
        ShardDataset(prepared, tokenizer_path=str(tmp_path / "other.model"))


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


def test_prepare_megatron_format_reads_back_token_for_token(tmp_path, prepared, small_corpus):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = tmp_path / "mg"
    manifest = prepare([str(small_corpus)], out, tokenizer=str(prepared / "tokenizer.model"), val_fraction=0.1,
                       progress=False, fmt="megatron")
    assert manifest["format"] == "pretrain-megatron" and (out / "train.bin").is_file()
    shards = ShardDataset(prepared, "train")
    megatron = IndexedDataset(str(out / "train"))
    docs = all_docs(shards)
    assert len(megatron) == len(docs)
    for i, doc in enumerate(docs):  # each document, EOS appended (--append-eod)
        assert megatron[i].tolist() == doc.tolist() + [shards.eos_id]


def test_shards_are_what_tarfile_writes(prepared, tmp_path):
    """The hand-built USTAR members equal tarfile's, byte for byte, so any tar reader takes them."""
    import io
    import tarfile

    name = ShardDataset(prepared).shards[0]["name"]
    ours = (prepared / name).read_bytes()
    with tarfile.open(prepared / name) as src, tarfile.open(tmp_path / "ref.tar", "w",
                                                            format=tarfile.USTAR_FORMAT) as ref:
        for member in src:
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = member.size, 0, 0o644
            ref.addfile(info, io.BytesIO(src.extractfile(member).read()))
    assert (tmp_path / "ref.tar").read_bytes() == ours
