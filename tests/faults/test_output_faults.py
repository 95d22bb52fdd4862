"""Writers never destroy their inputs or foreign files: an output that is, contains or lies inside an input is
refused, --overwrite or not; --overwrite replaces only an earlier output of the same tool."""

import shutil

import pytest

from .helpers import TINY, call, digest, refused, tool, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("out") / "run"
    from pretrain.train import main

    assert main(["--set", *TINY, "train.device=cpu", f"logging.run_dir={run}", "checkpoint.interval=2",
                 "train.steps=2"]) == 0
    return run


@pytest.fixture
def corpus(small_corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(small_corpus, copy)
    return copy


def prepare_cli(argv, capsys):
    return call(tool("prepare_data").main, [*argv, "--quiet"], capsys)


@pytest.mark.parametrize("layout", ["same", "inside", "contains"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_never_writes_over_or_into_its_input(corpus, tmp_path, capsys, layout, overwrite):
    out = {"same": corpus, "inside": corpus / "prepared", "contains": tmp_path}[layout]
    word = {"same": "is the input", "inside": "lies inside the input", "contains": "contains the input"}[layout]
    before = digest(corpus)
    refused(prepare_cli(["--input", str(corpus), "--output", str(out), "--vocab-size", "512",
                         *(["--overwrite"] if overwrite else [])], capsys), f"output .* {word} ")
    assert digest(corpus) == before


def test_prepare_output_is_the_tokenizer_it_reads(prepared, corpus, capsys):
    tokenizer = prepared / "tokenizer.model"
    before = digest(prepared)
    refused(prepare_cli(["--input", str(corpus), "--output", str(prepared), "--tokenizer", str(tokenizer),
                         "--overwrite"], capsys), r"contains the input .*tokenizer.model")
    assert digest(prepared) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_refuses_a_foreign_directory(corpus, tmp_path, capsys, overwrite):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("years of work")
    refused(prepare_cli(["--input", str(corpus), "--output", str(foreign), "--vocab-size", "512",
                         *(["--overwrite"] if overwrite else [])], capsys),
            r"holds files that are not an earlier prepared data set \(chapter1.tex\): refusing to replace it")
    assert (foreign / "chapter1.tex").read_text() == "years of work"


def test_prepare_refuses_a_file_as_output(corpus, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    refused(prepare_cli(["--input", str(corpus), "--output", str(target), "--vocab-size", "512", "--overwrite"],
                        capsys), r"output .*notes.txt is an existing file, not a directory")
    assert target.read_text() == "mine"


def test_prepare_replaces_its_own_output_only_with_overwrite(prepared, corpus, tmp_path, capsys):
    mine = tmp_path / "mine"
    shutil.copytree(prepared, mine)
    before = digest(mine)
    refused(prepare_cli(["--input", str(corpus), "--output", str(mine), "--tokenizer",
                         str(prepared / "tokenizer.model")], capsys),
            r"holds an earlier prepared data set \(pass --overwrite to replace it\)")
    assert digest(mine) == before
    code, out, err = prepare_cli(["--input", str(corpus), "--output", str(mine), "--tokenizer",
                                  str(prepared / "tokenizer.model"), "--overwrite"], capsys)
    assert code == 0 and (mine / "manifest.json").is_file()


@pytest.mark.parametrize("inputs, message", [
    (["nothing-here.txt"], r"no input files|does not exist|not found"),
    ([], None),
])
def test_prepare_bad_inputs(tmp_path, capsys, inputs, message):
    if not inputs:  # argparse: --input needs at least one
        code, _, err = prepare_cli(["--output", str(tmp_path / "o"), "--input"], capsys)
        assert code == 2 and "Traceback" not in err and "expected at least one argument" in err
        return
    refused(prepare_cli(["--input", str(tmp_path / inputs[0]), "--output", str(tmp_path / "o")], capsys), message)
    assert not (tmp_path / "o").exists()


def convert(argv, capsys):
    return call(tool("convert_checkpoint").main, argv, capsys)


@pytest.mark.parametrize("output, word", [("checkpoints", "is the input"), (".", "contains the input"),
                                          ("checkpoints/step-00000002/hf", "lies inside the input")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_writes_over_or_into_the_checkpoints(run, capsys, output, word, overwrite):
    before = digest(run)
    refused(convert(["--to", "hf", "--input", str(run / "checkpoints"), "--output", str(run / output),
                     *(["--overwrite"] if overwrite else [])], capsys), f"output .* {word} ")
    assert digest(run) == before


def test_export_refuses_a_foreign_directory_even_with_overwrite(run, tmp_path, capsys):
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "my_notes.md").write_text("mine")
    before = digest(foreign)
    refused(convert(["--to", "hf", "--input", str(run / "checkpoints"), "--output", str(foreign), "--overwrite"],
                    capsys), r"holds files that are not an earlier Hugging Face export")
    assert digest(foreign) == before


def test_export_and_import_replace_only_their_own_output(run, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert convert(["--to", "hf", "--input", str(run / "checkpoints"), "--output", str(hf)], capsys)[0] == 0
    refused(convert(["--to", "hf", "--input", str(run / "checkpoints"), "--output", str(hf)], capsys),
            r"holds an earlier Hugging Face export \(pass --overwrite")
    assert convert(["--to", "hf", "--input", str(run / "checkpoints"), "--output", str(hf), "--overwrite"],
                   capsys)[0] == 0
    before = digest(hf)
    for overwrite in ([], ["--overwrite"]):  # --to native onto its own HF input
        refused(convert(["--to", "native", "--input", str(hf), "--output", str(hf), *overwrite], capsys),
                r"output .* is the input ")
        refused(convert(["--to", "native", "--input", str(hf), "--output", str(hf / "native"), *overwrite], capsys),
                r"lies inside the input")
    assert digest(hf) == before
    native = tmp_path / "native"
    assert convert(["--to", "native", "--input", str(hf), "--output", str(native)], capsys)[0] == 0
    refused(convert(["--to", "native", "--input", str(hf), "--output", str(native)], capsys),
            r"holds an earlier model-only checkpoint")
    assert convert(["--to", "native", "--input", str(hf), "--output", str(native), "--overwrite"], capsys)[0] == 0
    refused(convert(["--to", "native", "--input", str(hf), "--output", str(run), "--overwrite"], capsys),
            r"holds files that are not an earlier model-only checkpoint")


def test_training_run_dir_is_the_data(prepared, capsys):
    """The run dir may not be the prepared data (checkpoints and metrics would be written into it)."""
    before = digest(prepared)
    code, out, err = train(["--set", *TINY, "train.device=cpu", f"logging.run_dir={prepared}", "data.source=shards",
                            f"data.path={prepared}", "model.vocab_size=512", "train.steps=1"], capsys)
    refused((code, out, err), r"logging.run_dir .* is the data .*: checkpoints and metrics would be written into it")
    assert digest(prepared) == before


@pytest.mark.parametrize("what", ["prepare", "export"])
def test_a_full_disk_under_a_writer_is_one_line_and_leaves_nothing(run, corpus, tmp_path, what):
    """A 64 KiB tmpfs in a private mount namespace: the write fails with ENOSPC part-way."""
    import os
    import sys

    from .helpers import process

    if shutil.which("unshare") is None or process(["unshare", "-rm", "true"])[0] != 0:
        pytest.skip("unshare -rm (user + mount namespaces) is not permitted here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if what == "prepare":
        cmd = [sys.executable, "tools/prepare_data.py", "--input", str(corpus), "--output", str(mnt / "out"),
               "--vocab-size", "512", "--quiet"]
    else:
        cmd = [sys.executable, "tools/convert_checkpoint.py", "--to", "hf", "--input", str(run / "checkpoints"),
               "--output", str(mnt / "out")]
    script = f"mount -t tmpfs -o size=64k tmpfs {mnt} && {' '.join(cmd)}; rc=$?; ls -A {mnt}; exit $rc"
    code, out, err = process(["unshare", "-rm", "sh", "-c", script], env={"PYTHONPATH": os.getcwd()})
    refused((code, out, err), r"cannot write .*mnt/.*: No space left on device")
    assert out.strip() == ""  # neither the output nor its temporary copy is left on the full disk
