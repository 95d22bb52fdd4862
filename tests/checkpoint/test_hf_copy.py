"""Hugging Face copies while training (checkpoint.hf_interval / hf_at_end): written from any layout, loadable by
transformers with the native step's logits, atomic, and refused up front when they cannot be written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.manager import CheckpointError, _crc32

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
COMMON = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=512",
          "model.seq_len=16", "model.qkv_bias=true", "train.micro_batch_size=2", "schedule.warmup_steps=1",
          "logging.interval=1", "logging.tensorboard=false", "eval.interval=0", "data.source=shards"]


def test_hf_copies_under_tp2_dp2_load_in_transformers_with_the_native_logits(tmp_path, prepared):
    from pretrain.checkpoint import load_model

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           "-m", "pretrain.train", "--set", *COMMON, f"data.path={prepared}", "parallel.tp=2",
                           "parallel.zero_stage=3", "train.steps=3", "checkpoint.hf_interval=2",
                           "checkpoint.hf_at_end=true", "checkpoint.interval=0", f"logging.run_dir={run}"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    copies = sorted(p.name for p in (run / "hf").iterdir())
    assert copies == ["step-00000002", "step-00000003"]  # the interval's step and the last one
    for name in copies:
        folder = run / "hf" / name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["step"] == int(name[5:])
        assert {f: _crc32(folder / f) for f in manifest["files"]} == {f: v["crc32"] for f, v in manifest["files"].items()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model"} <= set(manifest["files"])
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(hf).__name__ == "Qwen2ForCausalLM"  # q/k/v biases
        native, _ = load_model(run / "checkpoints" / name)
        tokens = torch.randint(0, 512, (2, 16))
        with torch.no_grad():
            assert (hf(input_ids=tokens).logits - native(tokens)).abs().max() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(run / "hf" / copies[-1]) is not None


def _native_step(tmp_path):
    from pretrain.checkpoint.hf import save_native
    from pretrain.config import load_config
    from pretrain.models import build_model

    cfg = load_config(None, COMMON[:7]).model
    torch.manual_seed(0)
    return save_native(build_model(cfg), cfg, tmp_path / "native")


def test_a_crash_while_writing_leaves_the_good_copy_and_no_half_folder(tmp_path, monkeypatch):
    from pretrain.checkpoint import hf as hf_module

    step = _native_step(tmp_path)
    out = tmp_path / "hf" / "step-00000000"
    hf_module.write_hf_copy(step, out, None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tensors, file, where):
        Path(file).write_bytes(b"garbage")  # half a file, then the process dies
        raise OSError(28, "No space left on device", str(file))

    monkeypatch.setattr(hf_module, "_save_safetensors", crash)
    with pytest.raises(OSError):
        hf_module.write_hf_copy(step, out, None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good copy, untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["step-00000000"]  # no temporary folder left
    shutil.rmtree(step.parent)
    with pytest.raises(CheckpointError):  # the native step is gone: nothing to copy, nothing written
        hf_module.write_hf_copy(step, tmp_path / "hf" / "other", None)
    assert not (tmp_path / "hf" / "other").exists()


@pytest.mark.parametrize("extra, message", [
    (["model.n_experts=4", "model.moe_top_k=2", "model.n_shared_experts=1", "model.qkv_bias=false"],
     "a softmax router with shared experts has no Hugging Face counterpart"),
    (["model.qk_norm=true"], "no Hugging Face class holds a llama-flavour GPT with QK-norm, q/k/v biases"),
])
def test_a_model_no_hugging_face_class_holds_is_refused_before_the_first_step(tmp_path, prepared, extra, message):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *COMMON, f"data.path={prepared}",
                           "train.steps=2", "checkpoint.hf_at_end=true", *extra,
                           f"logging.run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "hf").exists()


def test_a_read_only_hf_dir_is_refused_before_the_first_step(tmp_path, prepared):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("unshare -rm (user + mount namespaces) is not permitted here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = " ".join(f"'{a}'" for a in [*COMMON, f"data.path={prepared}", "train.steps=2", "checkpoint.hf_interval=1",
                                       f"checkpoint.hf_dir={mnt}/hf", f"logging.run_dir={tmp_path / 'run'}"])
    script = f"mount -t tmpfs -o ro tmpfs {mnt} && {sys.executable} -m pretrain.train --set {args}; rc=$?; " \
             f"ls -A {mnt}; exit $rc"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "Hugging Face copy dir (checkpoint.hf_dir)" in errors[0] and "Read-only file system" in errors[0]
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert proc.stdout.strip() == "" and (not metrics.exists() or metrics.read_text() == "")  # no step ran
