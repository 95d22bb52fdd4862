"""The loader: global order, exact resume (also across data-parallel sizes), workers, blending, BERT data,
Megatron datasets and bad samples."""

import collections
import json
import shutil

import numpy as np
import pytest
import torch

from pretrain.data.blend import Blend
from pretrain.data.documents import ShardDataset
from pretrain.data.prepare import DataError, prepare
from pretrain.data.samples import DocumentSamples, Permutation
from pretrain.data.stream import Loader
from pretrain.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, small_corpus, prepared):
    """30 short documents in ~6 shards: a few batches cross shard and epoch boundaries."""
    src = tmp_path_factory.mktemp("short")
    for i, path in enumerate(sorted(small_corpus.iterdir())[:30]):
        (src / f"{i:02d}.txt").write_text(path.read_text(errors="replace")[: 150 + 37 * i])
    out = tmp_path_factory.mktemp("short_shards") / "ds"
    prepare([str(src)], out, tokenizer=str(prepared / "tokenizer.model"), val_fraction=0.0, shard_tokens=500,
            progress=False)
    one = tmp_path_factory.mktemp("one_shard") / "ds"
    prepare([str(src)], one, tokenizer=str(prepared / "tokenizer.model"), val_fraction=0.0, shard_tokens=1 << 30,
            progress=False)
    return {"many": out, "one": one}


def corpus_stream(ds: ShardDataset) -> np.ndarray:
    """Documents in stored order, each followed by EOS."""
    return np.concatenate([np.append(ds.document(s, d), ds.eos_id)
                           for s in range(ds.num_shards) for d in range(len(ds.lengths(s)))])


def drain(loader: Loader, limit: int = 10_000) -> list[dict]:
    out = []
    for _ in range(limit):
        try:
            out.append(loader.next_batch())
        except StopIteration:
            break
    return out


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        p = Permutation(n, [1, n])
        values = [p(i) for i in range(n)]
        assert sorted(values) == list(range(n))
        if n > 8:
            assert values != list(range(n))
    assert [Permutation(100, [2])(i) for i in range(100)] != [Permutation(100, [3])(i) for i in range(100)]


def test_unshuffled_stream_is_the_corpus_in_order(prepared):
    ds = ShardDataset(prepared, "train")
    expected = corpus_stream(ds)
    T, B = 64, 4
    samples = DocumentSamples(ds, "gpt", T, shuffle=False, loop=False)
    assert len(samples) == (len(expected) - 1) // T
    batches = drain(Loader(samples, B))
    tokens = torch.cat([b["tokens"] for b in batches])
    targets = torch.cat([b["targets"] for b in batches])
    assert len(tokens) == len(samples)  # every sequence once, the last batch short
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    assert tokens.reshape(-1).tolist() == expected[:len(samples) * T].tolist()
    assert targets[-1].tolist() == expected[len(samples) * T - T + 1:len(samples) * T + 1].tolist()


@pytest.mark.parametrize("shards", ["many", "one"])  # "one": fewer shards than ranks x workers
def test_each_sample_once_per_epoch_across_ranks_and_workers(small_shards, shards):
    ds = ShardDataset(small_shards[shards], "train")
    T, B, world = 32, 3, 2
    samples = DocumentSamples(ds, "gpt", T, seed=11, shuffle=True, shuffle_window=16)
    S = len(samples)
    steps = -(-S // (world * B)) + 2  # into the second epoch
    seen: dict[int, torch.Tensor] = {}
    for rank in range(world):
        loader = Loader(samples, B, rank=rank, world=world, num_workers=2)
        for _ in range(steps):
            b = loader.next_batch()
            for g, row in zip(b["index"].tolist(), b["tokens"]):
                assert g not in seen
                seen[g] = row
    assert sorted(seen) == list(range(steps * world * B))
    # epoch 0: every sequence position once; its tokens are the corpus minus a tail shorter than a sequence
    positions = [samples.position(g) for g in range(S)]
    assert sorted(q for _, q in positions) == list(range(S)) and all(e == 0 for e, _ in positions)
    got = collections.Counter(torch.cat([seen[g] for g in range(S)]).tolist())
    corpus = collections.Counter(corpus_stream(ds).tolist())
    assert not got - corpus and sum((corpus - got).values()) <= T
    # the order is shuffled, and differently in the next epoch
    order0 = [q for _, q in positions]
    order1 = [samples.position(S + g)[1] for g in range(S)]
    assert order0 != sorted(order0) and order1 != order0


@pytest.mark.parametrize("mode, workers", [("gpt", 0), ("gpt", 2), ("bert", 2)])
def test_resume_is_exact(small_shards, mode, workers):
    ds = ShardDataset(small_shards["many"], "train")

    def loader():
        return Loader(DocumentSamples(ds, mode, 48, seed=5, shuffle_window=8), 4, num_workers=workers)

    straight = loader()
    batches = [straight.next_batch() for _ in range(100)]  # crosses shard and epoch boundaries
    assert batches[-1]["index"][-1] > len(straight.samples)
    for k in (1, 37, 71):
        probe = loader()
        for _ in range(k):
            probe.next_batch()
        state = json.loads(json.dumps(probe.state_dict()))  # survives the checkpoint's JSON
        resumed = loader()
        resumed.load_state_dict(state)
        for expected in batches[k:k + 4]:
            got = resumed.next_batch()
            assert got.keys() == expected.keys()
            for key in expected:
                assert torch.equal(got[key], expected[key]), (k, key)


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2)])
def test_resume_with_another_data_parallel_size(small_shards, before, after):
    ds = ShardDataset(small_shards["many"], "train")
    samples = DocumentSamples(ds, "gpt", 32, seed=2, shuffle_window=8)
    B, k, m = 2, 5, 7

    def run(world: int, steps: int, state=None) -> tuple[dict[int, list[int]], list[dict]]:
        got, states = {}, []
        loaders = [Loader(samples, B, rank=r, world=world) for r in range(world)]
        for loader in loaders:
            if state:
                loader.load_state_dict(state)
        for _ in range(steps):
            for loader in loaders:
                b = loader.next_batch()
                for g, row in zip(b["index"].tolist(), b["tokens"].tolist()):
                    assert g not in got
                    got[g] = row
            states.append(loaders[0].state_dict())
            assert all(loader.state_dict() == states[-1] for loader in loaders)
        return got, states

    first, states = run(before, k)
    second, _ = run(after, m, json.loads(json.dumps(states[-1])))
    uninterrupted, _ = run(before, k + -(-m * after // before))
    assert not set(first) & set(second)
    union = {**first, **second}
    assert sorted(union) == list(range(k * before * B + m * after * B))
    assert all(uninterrupted[g] == row for g, row in union.items())


def test_blend_proportions_determinism_and_resume(small_shards, prepared):
    a = DocumentSamples(ShardDataset(prepared, "train"), "gpt", 32, seed=1)
    b = DocumentSamples(ShardDataset(small_shards["many"], "train"), "gpt", 32, seed=1)
    for weights in ([0.7, 0.3], [1, 1], [0.05, 0.95], [3, 0]):
        blend = Blend([a, b], weights)
        counts = np.bincount([blend.locate(g)[0] for g in range(10_000)], minlength=2)
        share = np.asarray(weights) / sum(weights)
        assert np.all(np.abs(counts / 10_000 - share) <= 0.01 * share + 1e-4), (weights, counts)
        # each source's own indices run 0, 1, 2, ... with nothing skipped
        for i in range(2):
            local = [blend.locate(g)[1] for g in range(10_000) if blend.locate(g)[0] == i]
            assert local == list(range(len(local)))
    blend = Blend([a, b], [0.7, 0.3], block=64)  # a small block: the pattern repeats many times
    assert [blend.locate(g) for g in range(64, 128)] == [(i, n + blend.count[i]) for i, n in
                                                       (blend.locate(g) for g in range(64))]
    straight = Loader(Blend([a, b], [0.7, 0.3]), 4)
    batches = [straight.next_batch() for _ in range(6)]
    resumed = Loader(Blend([a, b], [0.7, 0.3]), 4)
    resumed.load_state_dict({"cursor": 12})
    for expected in batches[3:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    for bad in ([-1, 2], [0, 0], [float("nan"), 1]):
        with pytest.raises(DataError, match="weights"):
            Blend([a, b], bad)


def test_blend_and_megatron_through_the_config(tmp_path, small_shards, prepared):
    pytest.importorskip("megatron.core")
    from pretrain.data import build_samples
    from tests.conftest import tiny_config

    mg = tmp_path / "mg"
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_text(f"document number {i}\n" + "def f(x):\n    return x * 2\n" * (i % 5 + 1))
    prepare([str(src)], mg, tokenizer=str(prepared / "tokenizer.model"), val_fraction=0.2, progress=False,
            fmt="megatron")
    prepare([str(src)], tmp_path / "sh", tokenizer=str(prepared / "tokenizer.model"), val_fraction=0.2,
            progress=False)
    base = ("data.source=shards", "model.vocab_size=512", "data.shuffle=false")
    cfg_mg = tiny_config(tmp_path, "data.source=megatron", f"data.path={mg}", *base[1:])
    cfg_sh = tiny_config(tmp_path, *base, f"data.path={tmp_path / 'sh'}")
    for split in ("train", "val"):
        from_mg, from_sh = build_samples(cfg_mg, split), build_samples(cfg_sh, split)
        assert len(from_mg) == len(from_sh) > 0
        for g in range(len(from_sh)):  # the same documents + EOS, packed the same way
            assert np.array_equal(from_mg.sample(g)["tokens"], from_sh.sample(g)["tokens"])
    # packed documents: the Megatron index gives the same document ids as the shards' (data.document_mask)
    docs = ("data.document_mask=true", "data.reset_positions=true")
    mg_docs = build_samples(tiny_config(tmp_path, "data.source=megatron", f"data.path={mg}", *base[1:], *docs))
    sh_docs = build_samples(tiny_config(tmp_path, *base, f"data.path={tmp_path / 'sh'}", *docs))
    for g in range(len(sh_docs)):
        a, b = mg_docs.sample(g), sh_docs.sample(g)
        assert np.array_equal(a["document_ids"], b["document_ids"]) and np.array_equal(a["positions"], b["positions"])
    assert max(int(mg_docs.sample(g)["document_ids"].max()) for g in range(len(sh_docs))) > 0
    # a raw Megatron prefix works too (given the tokenizer that wrote it)
    cfg_prefix = tiny_config(tmp_path, "data.source=megatron", f"data.path={mg / 'train'}", *base[1:],
                             f"data.tokenizer={prepared / 'tokenizer.model'}")
    assert np.array_equal(build_samples(cfg_prefix).sample(3)["tokens"], build_samples(cfg_sh).sample(3)["tokens"])
    blended = tiny_config(tmp_path, "model.vocab_size=512",
                          f'data.sources=[{{path = "{mg}", weight = 1}}, {{path = "{prepared}", weight = 3}}]',
                          "data.source=shards")
    blend = build_samples(blended)
    assert isinstance(blend, Blend) and list(blend.count) == [1 << 14, 3 << 14]


def test_megatron_zero_tokens_is_refused(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from pretrain.data.megatron import MegatronDocuments

    builder = IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16)
    builder.add_item(torch.zeros(0, dtype=torch.int64))
    builder.end_document()
    builder.finalize(str(tmp_path / "empty.idx"))
    with pytest.raises(DataError, match="holds zero tokens"):
        MegatronDocuments(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="missing"):
        MegatronDocuments(str(tmp_path / "nothing"))


def test_bert_batches(prepared):
    tok = Tokenizer.load(prepared / "tokenizer.model")
    ds = ShardDataset(prepared, "train")
    samples = DocumentSamples(ds, "bert", 64, shuffle=False, loop=False)
    assert len(samples) == sum(int(np.ceil(n / 62)) for s in range(ds.num_shards) for n in ds.lengths(s))
    b = Loader(samples, 8).next_batch()
    assert (b["tokens"][:, 0] == tok.cls_id).all()
    masked = b["labels"] != -100
    assert masked.any() and not masked[~b["attention_mask"]].any()
    assert (b["labels"][masked] != tok.cls_id).all()
    lengths = b["attention_mask"].sum(1)
    assert all(b["tokens"][i, lengths[i] - 1] == tok.sep_id for i in range(8))
    # documents longer than a sequence continue in the next sample
    first = ds.document(0, 0)
    original = torch.where(masked, b["labels"], b["tokens"])
    assert original[0, 1:63].tolist() == first[:62].tolist() and original[1, 1:63].tolist() == first[62:124].tolist()


@pytest.mark.parametrize("pairs", ["sop", "nsp"])
def test_sentence_pairs(prepared, pairs):
    ds = ShardDataset(prepared, "train")
    samples = DocumentSamples(ds, "bert", 48, seed=3, pairs=pairs)
    labels = []
    for g in range(400):
        s = samples.sample(g)
        original = np.where(s["labels"] != -100, s["labels"], s["tokens"])
        n = int(s["attention_mask"].sum())
        seps = np.flatnonzero(original[:n] == samples.sep)
        assert seps[-1] == n - 1 and len(seps) >= 2
        a, b = original[1:seps[-2]], original[seps[-2] + 1:n - 1]
        assert (s["token_type_ids"][:seps[-2] + 1] == 0).all() and (s["token_type_ids"][seps[-2] + 1:n] == 1).all()
        label = int(s["nsp_labels"])
        labels.append(label)
        chunk, _ = samples._chunk(*samples.position(g))
        if label == 0:
            assert np.concatenate([a, b]).tolist() == chunk.tolist()
        elif pairs == "sop":
            assert np.concatenate([b, a]).tolist() == chunk.tolist()
        else:
            assert a.tolist() == chunk[:len(a)].tolist() and len(a) + len(b) <= len(chunk)
    assert 0.4 < np.mean(labels) < 0.6


def test_mlm_masking_statistics():
    from pretrain.data.mlm import mask_tokens

    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 1000, size=200_000)
    valid = np.ones_like(tokens, dtype=bool)
    valid[-1000:] = False
    tokens[:500] = 5  # specials are never picked
    out, labels = mask_tokens(tokens, valid, rng, 4, 1000, 0.15, [0, 1, 2, 3, 4, 5, 6])
    picked = labels != -100
    assert picked.sum() == round(0.15 * (200_000 - 1500))
    assert not picked[:500].any() and not picked[-1000:].any()
    assert np.array_equal(labels[picked], tokens[picked])
    assert abs((out[picked] == 4).mean() - 0.8) < 0.01
    assert abs((out[picked] == tokens[picked]).mean() - 0.1) < 0.01
    assert (out[~picked] == tokens[~picked]).all()
    _, capped = mask_tokens(tokens[1000:1512], valid[1000:1512], rng, 4, 1000, 0.15, [5], max_predictions=20)
    assert (capped != -100).sum() == 20


def test_whole_word_masking(prepared):
    from pretrain.data.mlm import word_start_table

    tok = Tokenizer.load(prepared / "tokenizer.model")
    starts = word_start_table(tok)
    assert starts[tok.encode(" hello world")[0]] and starts[tok.cls_id]
    ds = ShardDataset(prepared, "train")
    samples = DocumentSamples(ds, "bert", 128, seed=4, whole_word_mask=True, max_predictions=19)
    partial_words = 0
    for g in range(200):
        s = samples.sample(g)
        picked = s["labels"] != -100
        assert 0 < picked.sum() <= 19
        original = np.where(picked, s["labels"], s["tokens"])
        n = int(s["attention_mask"].sum())
        for i in range(1, n - 1):
            # inside a word (not a word start, previous token ordinary), picked-ness is shared
            if not starts[original[i]] and original[i - 1] not in samples.special_ids:
                partial_words += picked[i] != picked[i - 1]
    assert partial_words <= 200  # only where a single over-long word had to be cut to the budget


def corrupt_copy(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    return out


def test_bad_samples_error_or_skip(prepared, tmp_path):
    broken = corrupt_copy(prepared, tmp_path)
    ds = ShardDataset(broken, "train")
    offset = int(ds.index[0][2, 0])
    with open(broken / ds.shards[0]["name"], "r+b") as f:  # flip a payload byte of document 2 of shard 0
        f.seek(offset + 1)
        byte = f.read(1)
        f.seek(offset + 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    size = (broken / ds.shards[1]["name"]).stat().st_size
    with open(broken / ds.shards[1]["name"], "r+b") as f:  # cut shard 1 in half
        f.truncate(size // 2)
    key = int(ds.index[0][2, 3])
    strict = DocumentSamples(ShardDataset(broken, "train"), "gpt", 64, shuffle=False)
    with pytest.raises(DataError, match=rf"shard train-000000.tar sample doc-{key:09d}: checksum mismatch"):
        drain(Loader(strict, 8, num_workers=0))
    with pytest.raises(DataError, match=r"^shard train-000000.tar sample doc-\d+: checksum mismatch[^\n]*$"):
        drain(Loader(strict, 8, num_workers=2))  # one line, also from a worker process
    lenient = DocumentSamples(ShardDataset(broken, "train", on_bad_sample="skip"), "gpt", 64, shuffle=False,
                              loop=False)
    batches = drain(Loader(lenient, 8))
    skipped = torch.cat([b["skipped"] for b in batches]).bool()
    targets = torch.cat([b["targets"] for b in batches])
    assert 0 < skipped.sum() < len(skipped) // 2
    assert (targets[skipped] == -100).all() and (targets[~skipped] != -100).all()
    clean = DocumentSamples(ShardDataset(prepared, "train"), "gpt", 64, shuffle=False, loop=False)
    assert all(np.array_equal(clean.sample(g)["tokens"], lenient.sample(g)["tokens"])
               for g in np.flatnonzero(~skipped.numpy())[:50])
    with pytest.raises(DataError, match=r"shard train-000001.tar sample doc-\d+: truncated"):
        [strict.store.document(1, d) for d in range(len(strict.store.lengths(1)))]


def test_trainer_counts_skipped_samples(prepared, tmp_path):
    from pretrain.distributed import DistInfo
    from pretrain.metrics import read_metrics
    from pretrain.train import build_trainer
    from tests.conftest import tiny_config

    broken = corrupt_copy(prepared, tmp_path)
    ds = ShardDataset(broken, "train")
    for s in range(ds.num_shards):  # damage every 4th document
        with open(broken / ds.shards[s]["name"], "r+b") as f:
            for d in range(0, len(ds.lengths(s)), 4):
                f.seek(int(ds.index[s][d, 0]))
                f.write(b"\xff\xff")
    cfg = tiny_config(tmp_path, "data.source=shards", f"data.path={broken}", "model.vocab_size=512",
                      "data.on_bad_sample=skip", "logging.interval=1", "eval.interval=0", "train.steps=3",
                      "data.num_workers=1")
    trainer = build_trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    losses = trainer.fit()
    trainer.metrics.close()
    assert all(np.isfinite(losses)) and trainer.data_skipped > 0
    assert read_metrics(cfg.logging.run_dir)[-1]["data_skipped"] == trainer.data_skipped


def _documents_of_stream(ds: ShardDataset) -> np.ndarray:
    """Each token of ``corpus_stream`` numbered by its document (EOS included)."""
    return np.concatenate([np.full(len(ds.document(s, d)) + 1, i) for i, (s, d) in enumerate(
        (s, d) for s in range(ds.num_shards) for d in range(len(ds.lengths(s))))])


@pytest.mark.parametrize("mask_boundary", [False, True])
def test_document_ids_positions_and_boundary_targets(prepared, mask_boundary):
    """``data.document_mask``: each GPT sample carries its tokens' documents (numbered from 0, the EOS its
    document's, a document running on from the previous sample its own), ``reset_positions`` the offsets in them,
    and ``mask_document_boundary`` leaves each document's last token's target out of the loss — all equal to what
    the unshuffled corpus says, and resume stays exact (the fields come from the index, per sample)."""
    ds = ShardDataset(prepared, "train")
    stream, owner = corpus_stream(ds), _documents_of_stream(ds)
    T = 64
    samples = DocumentSamples(ds, "gpt", T, shuffle=False, loop=False, documents=True, reset_positions=True,
                              mask_boundary=mask_boundary)
    boundaries = 0
    for q in range(len(samples)):
        s = samples.sample(q)
        mine = owner[q * T:q * T + T + 1]
        expected = np.unique(mine, return_inverse=True)[1].astype(np.int32)  # renumbered from 0 in order
        assert s["document_ids"].dtype == np.int32
        assert s["document_ids"].tolist() == expected[:-1].tolist()
        starts = [int(np.argmax(expected[:-1] == d)) for d in expected[:-1]]
        assert s["positions"].tolist() == [i - st for i, st in enumerate(starts)]
        ends = expected[1:] != expected[:-1]
        boundaries += int(ends.sum())
        want = stream[q * T + 1:q * T + T + 1].copy()
        if mask_boundary:
            want[ends] = -100
        assert s["targets"].tolist() == want.tolist()
    assert boundaries > 3  # the corpus has documents shorter than a sample
    shuffled = DocumentSamples(ds, "gpt", T, seed=3, documents=True)
    again = DocumentSamples(ds, "gpt", T, seed=3, documents=True)
    for g in (0, 5, len(shuffled) + 2):  # a fresh sample set (a resumed run) gives the same fields
        a, b = shuffled.sample(g), again.sample(g)
        assert all(np.array_equal(a[k], b[k]) for k in ("tokens", "targets", "document_ids"))


def test_document_fields_through_the_config(tmp_path, prepared):
    """The config's keys reach the samples (shards and synthetic; BERT samples hold one document each), and
    keys without the boundaries they need, or out of range, are refused in one line."""
    from pretrain.config import ConfigError
    from pretrain.data import build_samples
    from tests.conftest import tiny_config

    shards = ("data.source=shards", f"data.path={prepared}", "model.vocab_size=512")
    s = build_samples(tiny_config(tmp_path, *shards, "data.document_mask=true", "data.reset_positions=true")).sample(0)
    assert set(s) >= {"document_ids", "positions"}
    s = build_samples(tiny_config(tmp_path, *shards, "data.document_mask=true"), "val").sample(0)
    assert "document_ids" in s and "positions" not in s
    bert = build_samples(tiny_config(tmp_path, *shards, "data.document_mask=true", arch="bert")).sample(0)
    assert not bert["document_ids"].any()
    synthetic = tiny_config(tmp_path, "data.document_mask=true", "data.reset_positions=true",
                            "data.mask_document_boundary=true", "data.synthetic_doc_len=3", "model.seq_len=64")
    rows = [build_samples(synthetic).sample(g) for g in range(20)]
    lengths = np.concatenate([np.bincount(r["document_ids"]) for r in rows])
    assert 1 <= lengths.min() and 2 < lengths.mean() < 4.5  # geometric, mean 3 (the row ends cut some)
    for r in rows:
        ends = r["document_ids"][1:] != r["document_ids"][:-1]  # (the last token's next document is not in the row)
        assert (r["targets"][:-1][ends] == -100).all() and (r["targets"][:-1][~ends] != -100).all()
        starts = np.append(True, ends)
        assert (r["positions"][starts] == 0).all() and (r["positions"][~starts] > 0).all()
    assert np.array_equal(build_samples(synthetic).sample(7)["document_ids"], rows[7]["document_ids"])
    for keys, message in [
        (("data.reset_positions=true",), "data.reset_positions = true needs data.document_mask = true"),
        (("data.mask_document_boundary=true",), "data.mask_document_boundary = true needs data.document_mask"),
        (("data.document_mask=true", "data.synthetic_doc_len=-1"), "data.synthetic_doc_len must be >= 0"),
        (("data.document_mask=true", "parallel.pp=2", "parallel.pp_schedule=zbv"),
         'data.document_mask = true with parallel.pp_schedule = "zbv" is not supported yet'),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, *keys)
