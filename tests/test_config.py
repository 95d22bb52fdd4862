import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import Config, ConfigError, config_from_toml, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.toml"))


def test_presets_load_and_round_trip():
    assert len(PRESETS) == 13
    for path in PRESETS:
        cfg = load_config(path)
        assert config_from_toml(cfg.to_toml()) == cfg


def test_gpt_70b_is_the_llama2_shape_and_fits_512_h100s():
    from pretrain.models.flops import num_params
    from pretrain.plan.check import check

    cfg = load_config(ROOT / "configs/gpt_70b.toml", ["plan.gpu=h100"])
    assert 68.9e9 < num_params(cfg.model) < 69.1e9
    line, error = check(cfg, 512)
    assert error is None and "of h100's 80 GiB" in line
    _, error = check(cfg, 64)  # an eighth of the GPUs: refused, with a layout that fits
    assert error is not None and "the best layout that fits: --set" in error


def test_deepseek_tiny_is_mla_with_group_routing_and_exports_as_deepseek_v3():
    from pretrain.checkpoint.hf import family_of
    from pretrain.models.flops import num_params

    m = load_config(ROOT / "configs/deepseek_tiny.toml").model
    assert m.mla and (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.v_head_dim) == (128, 64, 48, 32)
    assert (m.n_experts, m.moe_n_group, m.moe_topk_group, m.moe_routed_scaling) == (8, 4, 2, 2.5)
    assert family_of(m).hf_class == "DeepseekV3ForCausalLM" and 8e6 < num_params(m) < 10e6


def test_moe_1b_7b_is_the_olmoe_shape():
    from pretrain.models.flops import matmul_params, num_params
    from pretrain.parallel.dims import ParallelDims

    cfg = load_config(ROOT / "configs/moe_1b_7b.toml")
    m = cfg.model
    assert (m.n_layers, m.d_model, m.n_experts, m.moe_top_k, m.moe_ffn_hidden) == (16, 2048, 64, 8, 1024)
    assert 6.8e9 < num_params(m) < 7.0e9 and 1.1e9 < matmul_params(m) < 1.3e9  # 1B active of 7B
    dims = ParallelDims.from_config(cfg, 16)  # the launcher's 2 nodes × 8 GPUs
    assert (dims.dp_shard, dims.ep) == (16, 8)


def test_gpt_1b_32k_splits_the_sequence_over_cp_4():
    from pretrain.parallel.dims import ParallelDims

    cfg = load_config(ROOT / "configs/gpt_1b_32k.toml")
    dims = ParallelDims.from_config(cfg, 16)  # the launcher's 2 nodes × 8 GPUs
    assert (cfg.model.seq_len, dims.cp, dims.dp, cfg.parallel.cp_impl) == (32768, 4, 4, "alltoall")


def test_preset_shapes():
    cfg = load_config(ROOT / "configs/gpt_1b.toml")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.ffn_dim, cfg.model.vocab_size,
            cfg.model.seq_len) == (2048, 24, 16, 5632, 32000, 4096)


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs/gpt_tiny.toml", [
        "optim.lr=1e-3", "train.steps=7", "model.tie_embeddings=true", "logging.run_dir=runs/x",
        "optim.min_lr=0", 'schedule.decay="linear"', "data.sources=[{path = \"a\", weight = 1.0}]",
        'data.path=""',
    ])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.model.tie_embeddings is True
    assert cfg.logging.run_dir == "runs/x"
    assert cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)  # int accepted for a float
    assert cfg.schedule.decay == "linear"
    assert cfg.data.sources == [{"path": "a", "weight": 1.0}]


@pytest.mark.parametrize("overrides, message", [
    (["model.d_modle=64"], "unknown key model.d_modle (did you mean 'd_model'?)"),
    (["modle.d_model=64"], "unknown config section [modle] (did you mean 'model'?)"),
    (["train.steps=abc"], "train.steps expects int, got str 'abc'"),
    (["train.steps=1.5"], "train.steps expects int, got float 1.5"),
    (["model.tie_embeddings=3"], "model.tie_embeddings expects bool, got int 3"),
    (["model.d_model=100", "model.n_heads=3"], "model.d_model (100) must be divisible by model.n_heads (3)"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
    (["model.flavor=gpt2", "model.seq_len=2048", "model.max_position_embeddings=1024"],
     "model.seq_len (2048) exceeds model.max_position_embeddings (1024) of this gpt2 model"),
    (["model.arch=bert", "model.seq_len=1024", "model.max_position_embeddings=512"],
     "model.seq_len (1024) exceeds model.max_position_embeddings (512) of this bert model"),
    (["schedule.decay=cosin"], "schedule.decay = 'cosin' is not one of cosine, linear, wsd, constant"),
    (["model.kernels=rms_norm,attention", "parallel.tp=2"],
     "the Triton norms take whole tensors, not the sequence shards of parallel.sequence_parallel"),
    (["data.source=shards", "data.path="], 'data.source = "shards" needs data.path'),
    (["steps=3"], "is not of the form section.key"),
    (["data.source=shards", 'data.sources=[{path = "a", weight = -1}]'],
     "data.sources[0].weight must be a finite number >= 0, got -1"),
    (["data.source=shards", 'data.sources=[{path = "a", weight = 0}, {path = "b", weight = 0.0}]'],
     "data.sources weights sum to zero"),
    (["data.source=shards", 'data.sources=[{file = "a"}]'], "data.sources[0] must be {path"),
    (["data.source=shards", 'data.sources=[{path = "a"}]', 'data.path="b"'], "data.sources (a blend) replaces"),
    (["data.on_bad_sample=ignore"], "data.on_bad_sample = 'ignore' is not one of error, skip"),
    (["model.arch=bert", "data.bert_pairs=nsp"], 'data.bert_pairs = "nsp" needs model.arch = "bert" and model.nsp'),
    (['model.rope_scaling={rope_type = "dynamic", factor = 2.0}'],
     "model.rope_scaling.rope_type = 'dynamic' is not one of linear, llama3, yarn"),
    (['model.rope_scaling={factor = 2.0}'], "model.rope_scaling.rope_type = None is not one of"),
    (['model.rope_scaling={rope_type = "yarn", factor = 4.0}'],
     "model.rope_scaling (yarn) lacks original_max_position_embeddings"),
    (['model.rope_scaling={rope_type = "linear", factor = 0.0}'],
     "model.rope_scaling.factor must be a finite number > 0, got 0.0"),
    (['model.rope_scaling={rope_type = "llama3", factor = 8.0, low_freq_factor = 4.0, high_freq_factor = 1.0, '
      "original_max_position_embeddings = 8192}"], "high_freq_factor (1.0) must exceed low_freq_factor (4.0)"),
    (['model.rope_scaling={rope_type = "linear", factor = 2.0}', "model.flavor=gpt2"],
     "model.rope_scaling is for the llama-flavour GPT (RoPE), not gpt/gpt2"),
    (["model.head_dim=7"], "rotary embeddings need an even head dim; model.head_dim = 7"),
    (["model.head_dim=16", "model.arch=bert"], "model.head_dim is for the llama-flavour GPT"),
    (["model.d_model=100", "model.n_heads=3", "model.head_dim=-2"], "model.head_dim must be >= 0, got -2"),
    (["model.qkv_bias=true", "model.flavor=gpt2"], "model.qkv_bias is for the llama-flavour GPT"),
    (["model.rope_scaling=4"], "model.rope_scaling expects dict, got int 4"),
    (["train.mixed_precision=weights"], 'train.mixed_precision = "weights" (bf16 compute weights over fp32 '
                                        'masters): it is bf16 training: set train.dtype = "bf16"'),
    (["train.mixed_precision=weights", "train.dtype=bf16", "parallel.tp=2", "parallel.sequence_parallel=false"],
     "parallel.tp = 2 is not covered yet"),
    (["train.mixed_precision=weights", "train.dtype=bf16", "train.fp8=tensorwise"], "train.fp8 casts the weights"),
    (["train.mixed_precision=bf16"], "train.mixed_precision = 'bf16' is not one of auto, weights, autocast"),
])
def test_bad_values_give_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_head_dim_is_free_of_d_model_over_heads():
    cfg = load_config(None, ["model.d_model=100", "model.n_heads=3", "model.head_dim=32"])
    assert cfg.model.head_size == 32 and load_config(None, []).model.head_size == 16


def test_llama_seq_len_is_not_bounded_by_positions():
    assert load_config(None, ["model.seq_len=8192"]).model.seq_len == 8192


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optim]\nlearning_rate = 3e-4\n")
    with pytest.raises(ConfigError, match="unknown key optim.learning_rate"):
        load_config(unknown)


def test_defaults_are_valid():
    assert isinstance(load_config(), Config)


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.toml"], "error: config file not found: missing.toml"),
    (["--set", "model.d_modle=3"], "error: unknown key model.d_modle (did you mean 'd_model'?)"),
    (["--set", "data.source=shards", "data.path=/nonexistent/dir"], "error: data dir /nonexistent/dir does not exist"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *args, "--set", f"logging.run_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_keys_a_config_never_reads_are_said_aloud(capsys):
    """A key set for a feature that is off (Muon's with AdamW, MoE's without experts, FP8's without FP8, pipeline
    and context-parallel choices on one stage / one cp rank, mixed precision in fp32) is a note at start and
    under --check; the presets carry none."""
    cfg = load_config(None, ["optim.muon_lr=0.01", "model.moe_top_k=4", "train.fp8_keep_edge_blocks=2",
                             "parallel.pp_schedule=zbv", "parallel.cp_impl=alltoall", "train.mixed_precision=autocast"])
    assert cfg.inert() == [
        "model.moe_top_k = 4 has no effect: model.n_experts = 0",
        "optim.muon_lr = 0.01 has no effect: optim.name = 'adamw'",
        'train.fp8_keep_edge_blocks = 2 has no effect: train.fp8 = "none"',
        "train.mixed_precision = 'autocast' has no effect: train.dtype = 'fp32'",
        "parallel.cp_impl = 'alltoall' has no effect: parallel.cp = 1",
        "parallel.pp_schedule = 'zbv' has no effect: parallel.pp = 1",
    ]
    assert load_config(None, ["optim.name=muon", "optim.muon_lr=0.01"]).inert() == []
    for path in sorted((ROOT / "configs").glob("*.toml")):
        assert load_config(path).inert() == [], path.name
    from pretrain.train import main

    assert main(["--check", "--set", "data.source=synthetic", "optim.muon_lr=0.01"]) == 0
    assert "note: optim.muon_lr = 0.01 has no effect: optim.name = 'adamw'" in capsys.readouterr().out
