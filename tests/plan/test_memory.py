"""The memory model against what the ranks hold (tools/bench_memory.py under torchrun, one launch per world
size for all its layouts), its command line, and --check's refusal."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.plan.memory import estimate_memory

ROOT = Path(__file__).resolve().parents[2]
BASE = ("model.n_layers=4 model.d_model=64 model.n_heads=4 model.vocab_size=128 model.seq_len=32 "
        "train.micro_batch_size=2 model.tie_embeddings=false parallel.meta_init=false")
MOE = "model.n_experts=4 model.moe_top_k=2 model.moe_ffn_hidden=32 model.n_shared_experts=1"
MLA = ("model.attention=mla model.q_lora_rank=32 model.kv_lora_rank=24 model.qk_nope_head_dim=16 "
       "model.qk_rope_head_dim=8 model.v_head_dim=12")
LAYOUTS = {
    2: {"dp2": "", "zero1": "parallel.zero_stage=1", "zero2": "parallel.zero_stage=2",
        "zero3": "parallel.zero_stage=3", "tp2_sp": "parallel.tp=2",
        "tp2": "parallel.tp=2 parallel.sequence_parallel=false", "pp2_gpipe": "parallel.pp=2 parallel.pp_schedule=gpipe",
        "pp2_1f1b": "parallel.pp=2", "pp2_1f1b_4micro": "parallel.pp=2 parallel.n_microbatches=4 train.micro_batch_size=4",
        "pp2_interleaved": "parallel.pp=2 parallel.pp_schedule=interleaved_1f1b",
        "pp2_zbv": "parallel.pp=2 parallel.pp_schedule=zbv",
        "cp2_ring_zero3": "parallel.cp=2 parallel.zero_stage=3", "cp2_alltoall": "parallel.cp=2 parallel.cp_impl=alltoall",
        "ac_full": "parallel.activation_checkpointing=full", "ac_selective": "parallel.activation_checkpointing=selective",
        "muon_zero3": "optim.name=muon parallel.zero_stage=3", "moe": MOE,
        "moe_ep2": f"{MOE} parallel.ep=2 parallel.zero_stage=2", "bert_tp2": "model.arch=bert parallel.tp=2 "
        "parallel.sequence_parallel=false", "gpt2_tied_pp2": "model.flavor=gpt2 model.tie_embeddings=true parallel.pp=2",
        "mla": MLA, "mtp": "model.mtp_depth=1", "mla_mtp_moe": f"{MLA} {MOE} model.mtp_depth=2",
        # MTP on the last stage with its embedding copy; MLA's and MTP's blocks split by TP (+ SP)
        "mla_mtp_moe_pp2": f"{MLA} {MOE} model.mtp_depth=2 parallel.pp=2",
        "mla_mtp_moe_tp2_sp": f"{MLA} {MOE} model.mtp_depth=2 parallel.tp=2"},
    4: {"hsdp_2x2": "parallel.dp_replicate=2 parallel.zero_stage=3", "zero3_4": "parallel.zero_stage=3",
        "tp2_dp2_zero3": "parallel.tp=2 parallel.zero_stage=3", "pp2_dp2_zero2": "parallel.pp=2 parallel.zero_stage=2",
        "tp2_pp2": "parallel.tp=2 parallel.pp=2", "cp2_dp2_ac": "parallel.cp=2 parallel.zero_stage=3 "
        "parallel.activation_checkpointing=full", "moe_ep4_zero3": f"{MOE} parallel.ep=4 parallel.zero_stage=3",
        **{f"pp4_{s}": f"model.n_layers=8 train.micro_batch_size=8 parallel.pp=4 parallel.n_microbatches=8 "
                       f"parallel.pp_schedule={s}" for s in ("gpipe", "1f1b", "interleaved_1f1b", "zbv")}},
}
# activations (saved tensors + logits) within 10 %


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks: ~65 s in the suite
def test_predicted_memory_equals_what_the_ranks_hold(world):
    args = []
    for name, extra in LAYOUTS[world].items():
        args += ["--layout", name, f"{BASE} {extra}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           "tools/bench_memory.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    found = {m.group(1): json.loads(m.group(2)) for m in re.finditer(r"^MEMORY (\S+) (.*)$", proc.stdout, re.M)}
    assert set(found) == set(LAYOUTS[world]), proc.stdout[-2000:] + proc.stderr[-4000:]
    for name, r in found.items():
        measured, predicted = r["measured"], r["predicted"]
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
            assert abs(predicted[key] / measured[key] - 1) <= 0.01, (name, key, measured[key], predicted[key])
        acts = predicted["activations_bytes"] + predicted["logits_bytes"]
        assert abs(acts / measured["activations_bytes"] - 1) <= 0.1, (name, r)


def test_memory_command_prints_the_breakdown_as_json():
    proc = subprocess.run([sys.executable, "-m", "pretrain.plan", "memory", "--config", "configs/gpt_tiny.toml",
                           "--set", "parallel.zero_stage=3", "--world", "4"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "logits_bytes", "comm_bytes")
    assert out["total_bytes"] == sum(out[k] for k in parts) + out["detail"]["recompute_bytes"]
    one = estimate_memory(load_config(ROOT / "configs/gpt_tiny.toml"), 1)
    assert out["params_bytes"] < one.params_bytes / 3  # sharded four ways (ceil)


@pytest.mark.parametrize("args, message", [
    (["memory", "--config", "configs/gpt_tiny.toml", "--world", "3", "--set", "parallel.tp=2"],
     "world size 3 is not divisible"),
    (["memory", "--config", "configs/gpt_tiny.toml", "--world", "0"], "--world must be >= 1"),
    (["--config", "configs/gpt_tiny.toml", "--gpus", "8", "--gpu", "v100"], "unknown GPU 'v100'"),
    (["--config", "configs/gpt_tiny.toml", "--gpus", "8", "--gpu", "h100", "--global-batch-tokens", "lots"],
     "is not a number of tokens"),
    (["--config", "configs/gpt_tiny.toml", "--gpus", "3", "--gpu", "h100", "--global-batch-tokens", "1M"],
     "no layout of 3 GPUs splits 4096 sequences of 256 evenly"),
    (["--config", "configs/gpt_tiny.toml", "--gpus", "8", "--gpu", "h100", "--explain", "999"],
     "--explain 999: only 10 layout(s) shown"),
    (["--config", "configs/gpt_tiny.toml", "--gpus", "8", "--gpu", "h100", "--top", "0"], "--top must be >= 1, got 0"),
    (["--config", "configs/gpt_tiny.toml", "--gpus", "8", "--gpu", "h100", "--gpus-per-node", "-1"],
     "--gpus-per-node must be >= 0, got -1"),
    (["--config", "configs/gpt_tiny.toml", "--gpus", "-4", "--gpu", "h100"], "--gpus must be >= 1, got -4"),
])
def test_plan_bad_input_is_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "pretrain.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def _check(*overrides, world=8):
    env = {**os.environ, "WORLD_SIZE": str(world)}
    return subprocess.run([sys.executable, "-m", "pretrain.train", "--config", "configs/gpt_7b.toml", "--check",
                           "--set", "plan.gpu=h100", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_check_refuses_a_layout_predicted_not_to_fit_and_names_one_that_does():
    refused = _check("parallel.zero_stage=1", "parallel.activation_checkpointing=none")
    assert refused.returncode == 2
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and "does not fit the h100" in err[0] and "plan.force=true" in err[0], err
    assert "predicted memory per GPU:" in refused.stdout
    suggestion = re.search(r"--set (.*?) \(predicted", err[0]).group(1).split()
    fixed = _check("parallel.zero_stage=1", "parallel.activation_checkpointing=none", *suggestion)
    assert fixed.returncode == 0, fixed.stderr  # the suggested layout passes the same check
    forced = _check("parallel.zero_stage=1", "parallel.activation_checkpointing=none", "plan.force=true")
    assert forced.returncode == 0 and "of h100's 80 GiB" in forced.stdout


def test_search_offers_only_layouts_the_trainer_accepts_and_its_pick_is_stable():
    from pretrain.parallel.dims import ParallelDims
    from pretrain.plan.hardware import gpu
    from pretrain.plan.search import search

    cfg = load_config(ROOT / "configs/gpt_1b.toml")
    options, tried = search(cfg, 16, gpu("h100"), 2**21, top=5)
    assert tried > 20 and options
    for option in options:
        again = load_config(ROOT / "configs/gpt_1b.toml", option.overrides)
        assert ParallelDims.from_config(again, 16) == option.dims
        assert option.memory.total_bytes <= 80 * 2**30 * cfg.plan.usable_fraction
    assert [o.speed.tokens_per_s for o in options] == sorted((o.speed.tokens_per_s for o in options), reverse=True)
    ties = [(a, b) for a, b in zip(options, options[1:]) if round(a.speed.tokens_per_s) == round(b.speed.tokens_per_s)]
    assert all(a.memory.total_bytes <= b.memory.total_bytes for a, b in ties)  # equal speed: smaller first
    best = options[0]
    assert (best.dims.tp, best.dims.pp, best.dims.cp) == (1, 1, 1)  # 1.4 B on 16 H100s: plain data parallel
    assert search(cfg, 16, gpu("h100"), 2**21, top=5)[0][0].overrides == best.overrides


def test_deepseek_16b_is_the_planners_pick_for_64_h100s():
    """configs/deepseek_16b.toml holds the layout the planner picks for its slurm script's 64 H100s: searching
    from it returns its own dims, ZeRO stage, checkpointing and micro-batching."""
    from pretrain.parallel.dims import ParallelDims
    from pretrain.plan.hardware import gpu
    from pretrain.plan.search import search

    cfg = load_config(ROOT / "configs/deepseek_16b.toml")
    options, _ = search(cfg, 64, gpu("h100"), 2**22, top=5)
    best = options[0]
    again = load_config(ROOT / "configs/deepseek_16b.toml", best.overrides)
    assert (best.dims.pp, best.dims.dp) == (2, 32) and best.dims == ParallelDims.from_config(cfg, 64)
    picked = lambda c: (c.parallel.zero_stage, c.parallel.activation_checkpointing, c.parallel.pp_schedule,  # noqa
                        c.train.micro_batch_size, c.train.grad_accum)
    assert picked(again) == picked(cfg)


def test_memory_check_logs_predicted_against_measured_at_step_two(tmp_path, capsys):
    from pretrain.callbacks import MemoryCheck
    from pretrain.distributed import DistInfo
    from pretrain.metrics import read_metrics
    from pretrain.train import build_trainer

    from ..conftest import tiny_config

    trainer = build_trainer(tiny_config(tmp_path, "train.steps=3", "logging.interval=1"), DistInfo())
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, MemoryCheck)]
    trainer.callbacks.append(MemoryCheck(measure=lambda: 3 * 2**20))
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    predicted = estimate_memory(trainer.cfg, 1).total_bytes / 2**30
    assert rows[1]["mem_measured_gb"] == round(3 / 1024, 3) and rows[1]["mem_predicted_gb"] == round(predicted, 3)
    assert "mem_predicted_gb" not in rows[0]
    assert "memory at step 2: predicted" in capsys.readouterr().out


def test_a_refused_layout_is_refused_by_the_planner_too():
    with pytest.raises(ConfigError, match="must divide model.n_heads"):
        estimate_memory(load_config(None, ["model.n_heads=4", "model.d_model=64", "parallel.tp=8"]), 8)


def test_deepspeed_layouts_get_an_estimate_not_a_refusal():
    from pretrain.plan.check import check

    cfg = load_config(ROOT / "configs/gpt_7b.toml", ["parallel.engine=deepspeed", "parallel.zero_stage=1",
                                                      "parallel.activation_checkpointing=none", "plan.gpu=h100"])
    line, error = check(cfg, 8)
    assert error is None and "as the native engine" in line


def test_the_readmes_check_example_is_what_the_command_prints():
    """README numbers come from a command: tools/readme_numbers.py regenerates the --check example and fails when
    the README's copy has drifted (the demo block is regenerated the same way after tools/demo.sh)."""
    done = subprocess.run([sys.executable, "tools/readme_numbers.py", "--check-example"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_bf16_weight_copies_are_counted_as_the_step_holds_them(tmp_path):
    """One process in bf16 (``train.mixed_precision`` auto): the step holds a bf16 copy of every matmul weight —
    the bytes the engine's copies take, q/k/v and gate/up stacked or not; none in fp32, under autocast, or where
    FSDP's policy gathers bf16 weights instead."""
    import torch

    from pretrain.distributed import DistInfo
    from pretrain.train import build_trainer

    from ..conftest import tiny_config

    extra = ("train.dtype=bf16", "model.kernels=swiglu", "model.n_kv_heads=2")
    trainer = build_trainer(tiny_config(tmp_path, *extra), DistInfo())
    with trainer.engine.weights.step():
        copies = list(trainer.engine.weights.copies.values())
    assert copies and all(c.dtype == torch.bfloat16 for c in copies)
    held = sum(c.numel() * c.element_size() for c in copies)
    predicted = estimate_memory(tiny_config(tmp_path, *extra), 1)
    assert predicted.detail["weight_copies_bytes"] == held > 0
    assert predicted.total_bytes == estimate_memory(tiny_config(tmp_path, *extra, "train.mixed_precision=autocast"),
                                                    1).total_bytes + held
    for other in (("train.dtype=fp32",), ("train.mixed_precision=autocast",)):
        assert "weight_copies_bytes" not in estimate_memory(tiny_config(tmp_path, *extra, *other), 1).detail
    assert "weight_copies_bytes" not in estimate_memory(tiny_config(tmp_path, *extra, "parallel.zero_stage=3"),
                                                        2).detail
