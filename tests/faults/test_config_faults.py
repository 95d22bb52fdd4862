"""Bad numbers and names in a config: refused at load with one line naming the key, exit 2, before anything
exists on disk (``--check`` and a real run alike)."""

import re

import pytest
import torch

from .helpers import ROOT, TINY, refused, train

CASES = [  # (override, what the line must say)
    ("optim.lr=inf", r"optim.lr must be a finite number, got inf"),
    ("optim.lr=nan", r"optim.lr must be a finite number, got nan"),
    ("optim.lr=-inf", r"optim.lr must be a finite number"),
    ("optim.lr=0", r"optim.lr must be > 0"),
    ("optim.lr=-3e-4", r"optim.lr must be > 0"),
    ("optim.min_lr=-1", r"optim.min_lr must be >= 0"),
    ("optim.min_lr=1.0", r"0 <= optim.min_lr <= optim.lr"),
    ("optim.eps=0", r"optim.eps must be > 0"),
    ("optim.eps=-1e-8", r"optim.eps must be > 0"),
    ("optim.beta1=1.0", r"optim.beta1 must be in \[0, 1\)"),
    ("optim.beta1=-0.1", r"optim.beta1 must be in \[0, 1\)"),
    ("optim.beta2=1.5", r"optim.beta2 must be in \[0, 1\)"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay must be >= 0"),
    ("optim.grad_clip=-1", r"optim.grad_clip must be >= 0"),
    ("optim.grad_clip=inf", r"optim.grad_clip must be a finite number"),
    ("optim.impl=cuda", r"optim.impl = 'cuda' is not one of torch, triton, apex"),
    ("optim.impl=triton parallel.engine=deepspeed", r'optim.impl = "triton" runs on the native engine'),
    ("optim.impl=triton parallel.zero_stage=1", r'optim.impl = "triton" does not combine with parallel.zero_stage'),
    ("optim.impl=triton parallel.cpu_offload=true", r'optim.impl = "triton" with parallel.cpu_offload = true'),
    ("model.rope_theta=0", r"model.rope_theta must be > 0"),
    ("model.rope_theta=-10000", r"model.rope_theta must be > 0"),
    ("model.rope_theta=nan", r"model.rope_theta must be a finite number"),
    ("model.norm_eps=-1", r"model.norm_eps must be > 0"),
    ("model.norm_eps=0", r"model.norm_eps must be > 0"),
    ("model.init_std=-0.02", r"model.init_std must be > 0"),
    ("model.init_std=0", r"model.init_std must be > 0"),
    ("model.type_vocab_size=0", r"model.type_vocab_size must be >= 1"),
    ("model.vocab_size=1", r"model.vocab_size must be >= 2"),
    ("model.vocab_size=0", r"model.vocab_size must be >= 2"),
    ("model.n_layers=0", r"model.n_layers must be >= 1"),
    ("model.d_model=-64", r"model.d_model must be >= 1"),
    ("model.n_heads=0", r"model.n_heads must be >= 1"),
    ("model.n_kv_heads=-1", r"model.n_kv_heads must be >= 0"),
    ("model.n_kv_heads=3", r"model.n_heads \(4\) must be divisible by model.n_kv_heads \(3\)"),
    ("model.d_model=30", r"model.d_model \(30\) must be divisible by model.n_heads \(4\)"),
    ("model.ffn_hidden=-1", r"model.ffn_hidden must be >= 0"),
    ("model.seq_len=0", r"model.seq_len must be >= 1"),
    ("model.max_position_embeddings=-1", r"model.max_position_embeddings must be >= 0"),
    ("model.dropout=1.0", r"model.dropout must be in \[0, 1\)"),
    ("model.dropout=-0.1", r"model.dropout must be in \[0, 1\)"),
    ("model.arch=t5", r"model.arch = 't5' is not one of gpt, bert"),
    ("model.flavor=mistral", r"model.flavor = 'mistral' is not one of llama, gpt2"),
    ("model.kernels=cuda", r"model.kernels"),
    ("model.d_model=36", r"divisible by model.n_heads|even head dim"),
    ("data.seed=-1", r"data.seed must be >= 0"),
    ("data.num_workers=-2", r"data.num_workers must be >= 0"),
    ("data.prefetch_factor=0", r"data.prefetch_factor must be >= 1"),
    ("data.shuffle_window=0", r"data.shuffle_window must be >= 1"),
    ("data.mlm_probability=0", r"data.mlm_probability must be in \(0, 1\)"),
    ("data.mlm_probability=1", r"data.mlm_probability must be in \(0, 1\)"),
    ("data.max_predictions_per_seq=-1", r"data.max_predictions_per_seq must be >= 0"),
    ("data.source=s3", r"data.source = 's3' is not one of shards, synthetic, megatron"),
    ("data.source=shards", r'data.source = "shards" needs data.path'),
    ("data.on_bad_sample=ignore", r"data.on_bad_sample = 'ignore' is not one of error, skip"),
    ("data.bert_pairs=nsp", r'data.bert_pairs = "nsp" needs model.arch = "bert"'),
    ("parallel.tp=0", r"parallel.tp must be >= 1"),
    ("parallel.pp=-1", r"parallel.pp must be >= 1"),
    ("parallel.dp_replicate=0", r"parallel.dp_replicate must be >= 1"),
    ("parallel.zero_stage=4", r"parallel.zero_stage must be 0, 1, 2 or 3"),
    ("parallel.stages_per_rank=0", r"parallel.stages_per_rank must be >= 1"),
    ("parallel.n_microbatches=-1", r"parallel.n_microbatches must be >= 0"),
    ("parallel.activation_checkpointing_every=0", r"parallel.activation_checkpointing_every must be >= 1"),
    ("parallel.engine=fsdp", r"parallel.engine = 'fsdp' is not one of native, deepspeed"),
    ("parallel.pp_schedule=dualpipe", r"parallel.pp_schedule = 'dualpipe' is not one of"),
    ("parallel.activation_checkpointing=some", r"parallel.activation_checkpointing = 'some' is not one of"),
    ("schedule.warmup_steps=-5", r"schedule.warmup_steps must be >= 0"),
    ("schedule.decay_fraction=0", r"schedule.decay_fraction must be in \(0, 1\]"),
    ("schedule.decay_fraction=1.5", r"schedule.decay_fraction must be in \(0, 1\]"),
    ("schedule.decay=step", r"schedule.decay = 'step' is not one of"),
    ("train.steps=0", r"train.steps must be >= 1"),
    ("train.steps=-100", r"train.steps must be >= 1"),
    ("train.micro_batch_size=0", r"train.micro_batch_size must be >= 1"),
    ("train.grad_accum=0", r"train.grad_accum must be >= 1"),
    ("train.seed=-7", r"train.seed must be >= 0"),
    ("train.max_nonfinite_steps=0", r"train.max_nonfinite_steps must be >= 1"),
    ("train.collective_timeout_s=0", r"train.collective_timeout_s must be > 0"),
    ("train.collective_timeout_s=inf", r"train.collective_timeout_s must be a finite number"),
    ("train.dtype=fp16", r"train.dtype = 'fp16' is not one of fp32, bf16"),
    ("train.device=tpu", r"train.device = 'tpu' is not one of auto, cpu, cuda"),
    ("train.inject_nan_steps=[0]", r"train.inject_nan_steps must be a list of step numbers >= 1"),
    ("eval.interval=-1", r"eval.interval must be >= 0"),
    ("eval.steps=-1", r"eval.steps must be >= 0"),
    ("checkpoint.interval=-10", r"checkpoint.interval must be >= 0"),
    ("checkpoint.keep_last=-1", r"checkpoint.keep_last must be >= 0"),
    ("checkpoint.keep_every=-1", r"checkpoint.keep_every must be >= 0"),
    ("logging.interval=-1", r"logging.interval must be >= 0"),
    ("logging.peak_tflops=-1", r"logging.peak_tflops must be >= 0"),
    ("logging.heartbeat_s=-1", r"logging.heartbeat_s must be >= 0"),
    ("logging.profile_steps=7-5", r"logging.profile_steps must be"),
    ("optim.lrr=3e-4", r"unknown key optim.lrr \(did you mean 'lr'\?\)"),
    ("optimizer.lr=3e-4", r"unknown config section \[optimizer\]"),
    ("train.steps=ten", r"train.steps expects int, got str 'ten'"),
    ("train.steps=1.5", r"train.steps expects int, got float"),
    ("model.tie_embeddings=1", r"model.tie_embeddings expects bool"),
    ("trainsteps=5", r"override key 'trainsteps' is not of the form section.key"),
    ("train.steps", r"override 'train.steps' is not of the form section.key=value"),
]


@pytest.mark.parametrize("override, message", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_line_before_anything_is_written(override, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    refused(train(["--check", "--set", f"logging.run_dir={run_dir}", *override.split()], capsys), message)
    refused(train(["--set", f"logging.run_dir={run_dir}", "train.device=cpu", *override.split()], capsys), message)
    assert not run_dir.exists()


def test_config_file_problems(tmp_path, capsys):
    refused(train(["--config", str(tmp_path / "missing.toml")], capsys), r"config file not found: .*missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    refused(train(["--config", str(bad)], capsys), r"bad.toml is not valid TOML")
    flat = tmp_path / "flat.toml"
    flat.write_text("steps = 3\n")
    refused(train(["--config", str(flat)], capsys), r"top-level key 'steps' .* must be a \[section\]")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    refused(train(["--config", str(binary)], capsys), r"binary.toml is not valid TOML")


def test_only_rank_zero_says_a_config_error_at_once(monkeypatch, capsys):
    """Every rank of a distributed run meets the same config error: rank 0 says it at once; another rank first
    waits the grace in which the launcher stops it once rank 0 has exited, and says it only if still running then
    (its own cause: tests/faults/test_rank_faults.py launches both cases)."""
    import pretrain.train

    slept = []
    monkeypatch.setattr(pretrain.train.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    refused(train(["--check", "--set", "optim.lr=inf"], capsys), "optim.lr must be a finite number")
    assert slept == [pretrain.train.SILENT_RANK_GRACE_S] and slept[0] >= 2
    monkeypatch.setenv("RANK", "0")
    refused(train(["--check", "--set", "optim.lr=inf"], capsys), "optim.lr must be a finite number")
    assert len(slept) == 1


@pytest.mark.parametrize("value", ["abc", "0", "-2", "2.5"])
def test_a_launcher_world_size_that_is_not_a_count_is_one_line(monkeypatch, capsys, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    refused(train(["--check", "--set", *TINY], capsys), rf"WORLD_SIZE = '{re.escape(value)}' is not a whole number >= 1")


def test_sample_top_k_zero_means_every_token_and_bench_data_refuses_empty_sizes(tmp_path, capsys):
    import subprocess
    import sys

    from pretrain.config import load_config
    from pretrain.models import build_model

    model = build_model(load_config(None, TINY).model)
    prompt = torch.tensor([[5, 6, 7]])
    generator = torch.Generator().manual_seed(0)
    out = model.generate(prompt, 4, temperature=1.0, top_k=0, generator=generator)
    assert out.shape == (1, 7)
    done = subprocess.run([sys.executable, "tools/bench_data.py", "--seq-len", "0"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith("--seq-len must be > 0, got 0")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("check", [True, False])
def test_fp8_that_converts_no_layer_is_the_same_line_with_and_without_check(tmp_path, capsys, check):
    """Every block of a 2-layer model is an edge block that train.fp8 keeps in high precision: training refuses
    in one line, and --check names the same rule instead of saying the config is fine."""
    argv = ["--set", *TINY, "model.n_layers=2", "train.fp8=tensorwise", "train.steps=1",
            f"logging.run_dir={tmp_path / 'run'}"]
    refused(train(["--check", *argv] if check else argv, capsys),
            r"train.fp8 = 'tensorwise' converts no Linear layer of this model: of its 2 blocks "
            r"train.fp8_keep_edge_blocks = 1 keeps the first and last ones in high precision")
