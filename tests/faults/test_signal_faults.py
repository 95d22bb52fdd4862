"""Interruptions: Ctrl-C saves like SIGTERM (a second one aborts at once), a stopped or killed prepare leaves no
temporary output behind for long, and the small tools refuse what they cannot do."""

import os
import signal
import subprocess
import sys
import time

from .helpers import ROOT, TINY, call, process, refused, tool


def start_training(run_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", "--set", *TINY, "train.device=cpu",
                             "train.steps=100000", f"logging.run_dir={run_dir}", "model.n_layers=4"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # wait for real steps before interrupting
        lines.append(line)
        if line.startswith("step 3/"):
            break
    return proc, lines


def test_ctrl_c_saves_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc, lines = start_training(run_dir)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, (out, err)
    assert "Traceback" not in out + err
    saved = [line for line in out.splitlines() if line.startswith("stop signal: saved checkpoint")]
    assert len(saved) == 1, out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert step >= 3 and (run_dir / "checkpoints" / latest / "manifest.json").is_file()
    code, out, err = process([sys.executable, "-m", "pretrain.train", "--set", *TINY, "train.device=cpu",
                              f"train.steps={step + 2}", f"logging.run_dir={run_dir}", "model.n_layers=4"])
    assert code == 0 and f"at step {step}" in out and f"done: {step + 2} steps" in out, (out, err)


def test_second_ctrl_c_aborts_at_once_with_one_line(tmp_path):
    proc, _ = start_training(tmp_path / "run")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 75:  # the step ended and the save finished between the two signals: also fine
        assert "stop signal: saved checkpoint" in out
        return
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1] == "interrupted (a second Ctrl-C): stopped without saving"


def _start_prepare(corpus, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "tools/prepare_data.py", "--input", str(corpus), "--output", str(out),
                             "--vocab-size", "512", "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.parent.glob(f".{out.name}.tmp-*")):
        time.sleep(0.05)
    return proc


def big_corpus(small_corpus, tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = "".join(p.read_text(errors="replace") for p in sorted(small_corpus.glob("*.py")))
    corpus.write_text(text * 30)  # long enough to be caught in the middle
    return corpus


def test_prepare_stopped_by_sigterm_or_ctrl_c_leaves_nothing(small_corpus, tmp_path):
    corpus = big_corpus(small_corpus, tmp_path)
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        out = tmp_path / f"out-{sig}"
        proc = _start_prepare(corpus, out)
        assert list(tmp_path.glob(f".{out.name}.tmp-*")), "prepare never started writing"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*"))


def test_prepare_killed_leaves_a_temporary_the_next_run_removes(small_corpus, tmp_path, prepared):
    corpus = big_corpus(small_corpus, tmp_path)
    out = tmp_path / "out"
    proc = _start_prepare(corpus, out)
    proc.kill()
    proc.communicate(timeout=60)
    orphans = list(tmp_path.glob(".out.tmp-*"))
    assert len(orphans) == 1
    code, stdout, err = process([sys.executable, "tools/prepare_data.py", "--input", str(small_corpus), "--output",
                                 str(out), "--tokenizer", str(prepared / "tokenizer.model"), "--quiet"])
    assert code == 0, err
    assert f"removed {orphans[0]}, left by an interrupted run" in err
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "manifest.json").is_file()


def test_small_tools_refuse_what_they_cannot_do(tmp_path, capsys):
    refused(call(tool("bench_kernels").main, ["--op", "nope", "--check"], capsys), r"unknown op 'nope'")
    code, out, err = process(["bash", "tools/demo.sh", "--help"])
    assert code == 0 and "Everything on CPU" in out and not (ROOT / "runs" / "gpt_tiny" / "hf.tmp").exists()
    refused(process(["bash", "tools/demo.sh", "--bogus"]), r"unknown option --bogus")
    refused(process(["bash", "tools/demo.sh", "train.steps"]), r"train.steps is not a section.key=value override")
