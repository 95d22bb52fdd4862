"""Wrong, edited or foreign data: refused at start with one line naming the file and the value."""

import json
import shutil

import pytest

from .helpers import TINY, call, digest, refused, tool, train


@pytest.fixture
def data(prepared, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(prepared, copy)
    return copy


@pytest.fixture(scope="module")
def other_tokenizer(small_corpus, tmp_path_factory):
    """The same corpus prepared with a different tokenizer (another vocabulary size)."""
    from pretrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("other") / "ds"
    prepare([str(small_corpus)], out, vocab_size=600, val_fraction=0.1, shard_tokens=20_000, progress=False)
    return out


def run_on(data_args, tmp_path, capsys, *extra):
    return train(["--set", *TINY, "train.device=cpu", f"logging.run_dir={tmp_path / 'run'}", "data.source=shards",
                  "model.vocab_size=640", "train.steps=1", *data_args, *extra], capsys)


def edit(data, **changes):
    manifest = json.loads((data / "manifest.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            del manifest[key]
        else:
            manifest[key] = value
    (data / "manifest.json").write_text(json.dumps(manifest))


MANIFEST_EDITS = [
    ({"vocab_size": 100}, r"tokenizer.model is not the tokenizer .*manifest.json records .*vocab 100"),
    ({"vocab_size": "512"}, r"vocab_size '512' is not an integer"),
    ({"vocab_size": 1}, r"vocab_size 1 is not an integer in \[2, 65536\]"),
    ({"vocab_size": 70000}, r"vocab_size 70000 is not an integer in \[2, 65536\]"),
    ({"eos_id": 512}, r"eos_id 512 is outside the vocabulary \[0, 512\)"),
    ({"eos_id": -1}, r"eos_id -1 is outside the vocabulary"),
    ({"eos_id": None}, r"eos_id None is outside the vocabulary"),
    ({"dtype": "float64"}, r"dtype 'float64' is not uint16 or uint32"),
    ({"dtype": KeyError}, r"manifest.json lacks dtype: re-prepare the data"),
    ({"tokenizer_hash": "0" * 64}, r"tokenizer.model is not the tokenizer .*records \(tokenizer_hash 000000000000"),
    ({"tokenizer_hash": KeyError, "splits": KeyError}, r"lacks tokenizer_hash, splits"),
    ({"format": "something-else"}, r"manifest.json is not a pretrain-shards manifest"),
]


@pytest.mark.parametrize("changes, message", MANIFEST_EDITS, ids=[str(c[0]) for c in MANIFEST_EDITS])
def test_edited_manifest_is_refused_at_start(data, tmp_path, capsys, changes, message):
    edit(data, **changes)
    before = digest(data)
    refused(run_on([f"data.path={data}"], tmp_path, capsys), message)
    assert digest(data) == before


@pytest.mark.parametrize("damage, message", [
    ("not_json", r"manifest.json is not valid JSON"),
    ("list", r"is not a pretrain-shards manifest"),
    ("missing", r"has no manifest.json \(make it with tools/prepare_data.py\)"),
    ("empty_dir", r"is empty \(make it with tools/prepare_data.py\)"),
    ("shard_missing", r"shard train-000000.tar is listed in .* but missing"),
    ("no_val", r"has no 'val' split"),
    ("swapped_tokenizer", r"tokenizer.model is not the tokenizer .*manifest.json records"),
])
def test_damaged_data_dir(data, other_tokenizer, tmp_path, capsys, damage, message):
    extra = []
    if damage == "not_json":
        (data / "manifest.json").write_text("{oops")
    elif damage == "list":
        (data / "manifest.json").write_text("[]")
    elif damage == "missing":
        (data / "manifest.json").unlink()
    elif damage == "empty_dir":
        shutil.rmtree(data)
        data.mkdir()
    elif damage == "shard_missing":
        (data / "train-000000.tar").unlink()
    elif damage == "no_val":
        edit(data, splits={"train": json.loads((data / "manifest.json").read_text())["splits"]["train"]})
        extra = ["eval.interval=1"]
    elif damage == "swapped_tokenizer":
        shutil.copy(other_tokenizer / "tokenizer.model", data / "tokenizer.model")
    refused(run_on([f"data.path={data}"], tmp_path, capsys, *extra), message)


def test_data_path_that_is_a_file_or_missing(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(run_on([f"data.path={tmp_path / 'f'}"], tmp_path, capsys), r"data dir .*f does not exist")
    refused(run_on([f"data.path={tmp_path / 'nope'}"], tmp_path, capsys), r"data dir .*nope does not exist")


def test_model_vocab_smaller_than_the_data(prepared, tmp_path, capsys):
    refused(run_on([f"data.path={prepared}"], tmp_path, capsys, "model.vocab_size=256"),
            r"tokenizer vocab \(512\) of .* is larger than model.vocab_size \(256\)")


def test_blend_of_two_tokenizers(prepared, other_tokenizer, tmp_path, capsys):
    sources = f'[{{path = "{prepared}", weight = 1}}, {{path = "{other_tokenizer}", weight = 1}}]'
    refused(run_on([f"data.sources={sources}"], tmp_path, capsys),
            r"data.sources\[1\] .* was prepared with tokenizer \w{12}, data.sources\[0\] .* with \w{12}: a blend "
            r"needs one tokenizer")


def test_data_tokenizer_of_another_preparation(prepared, other_tokenizer, tmp_path, capsys):
    refused(run_on([f"data.path={prepared}", f"data.tokenizer={other_tokenizer / 'tokenizer.model'}"], tmp_path,
                   capsys), r"data.tokenizer .* \(tokenizer_hash \w{12}\) is not the one .* was prepared with")


def test_sampling_with_another_tokenizer(prepared, other_tokenizer, tmp_path, capsys):
    assert run_on([f"data.path={prepared}"], tmp_path, capsys, "checkpoint.interval=1")[0] == 0
    refused(call(tool("sample").main, ["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--tokenizer",
                                       str(other_tokenizer / "tokenizer.model")], capsys),
            r"tokenizer .* \(\w{12}\) is not the one .* was trained with \(\w{12}\)")


@pytest.mark.parametrize("value, shown", [("null", "null"), ("3", "3"), ("[1, 2]", r"\[1, 2\]"),
                                          ('{"a": 1}', r'\{"a": 1\}'), ("true", "true")])
def test_jsonl_values_that_are_not_text(prepared, tmp_path, capsys, value, shown):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine text"}\n' + '{"text": ' + value + "}\n")
    refused(call(tool("prepare_data").main, ["--input", str(corpus), "--output", str(tmp_path / "o"), "--tokenizer",
                                             str(prepared / "tokenizer.model"), "--quiet"], capsys),
            rf"c.jsonl:2: field 'text' is {shown} \(\w+\), not a string")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.parametrize("line, message", [
    ("{not json}", r"c.jsonl:2: not valid JSON"),
    ('{"body": "x"}', r"c.jsonl:2: record has no field 'text' \(set --jsonl-field\)"),
    ('["text"]', r"c.jsonl:2: record has no field 'text'"),
])
def test_jsonl_records_that_are_not_records(prepared, tmp_path, capsys, line, message):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine text"}\n' + line + "\n")
    refused(call(tool("prepare_data").main, ["--input", str(corpus), "--output", str(tmp_path / "o"), "--tokenizer",
                                             str(prepared / "tokenizer.model"), "--quiet"], capsys), message)


def test_prepare_bad_numbers(small_corpus, tmp_path, capsys):
    for flags, message in ((["--val-fraction", "0.7"], r"val fraction must be in \[0, 0.5\)"),
                           (["--shard-tokens", "0"], r"shard tokens and workers must be positive"),
                           (["--workers", "-1"], r"shard tokens and workers must be positive")):
        refused(call(tool("prepare_data").main, ["--input", str(small_corpus), "--output", str(tmp_path / "o"),
                                                 "--quiet", *flags], capsys), message)
    assert not (tmp_path / "o").exists()


def test_a_bad_record_stops_tokenizer_training_too(small_corpus, tmp_path, capsys):
    """A bad record met while the tokenizer trains on the corpus is refused like one met while encoding."""
    corpus = tmp_path / "c.jsonl"
    text = "".join(p.read_text(errors="replace") for p in sorted(small_corpus.glob("*.py"))[:10])
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()[:3000])
                      + '{"text": null}\n')
    refused(call(tool("prepare_data").main, ["--input", str(corpus), "--output", str(tmp_path / "o"),
                                             "--vocab-size", "512", "--quiet"], capsys),
            r"c.jsonl:3001: field 'text' is null \(NoneType\), not a string")
    assert not (tmp_path / "o").exists()
