"""Hugging Face directories the converter would get wrong or cannot read: refused naming the field or the file,
nothing written. (Parity of what is implemented: tests/checkpoint/test_hf.py.)"""

import json
import re
import shutil

import pytest
import torch

from pretrain.checkpoint.hf import export_hf
from pretrain.config import load_config
from pretrain.models import build_model

from .helpers import call, refused, tool

FAMILIES = {
    "llama": ["model.flavor=llama", "model.n_kv_heads=2"],
    "mistral": ["model.n_kv_heads=2", "model.hf_architecture=MistralForCausalLM"],
    "qwen2": ["model.n_kv_heads=2", "model.qkv_bias=true"],
    "gpt2": ["model.flavor=gpt2", "model.tie_embeddings=true"],
    "bert": ["model.arch=bert"],
    "mixtral": ["model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16"],
    "qwen3_moe": ["model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16", "model.qk_norm=true"],
    "glm4_moe": ["model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16", "model.moe_router=sigmoid",
                 "model.n_shared_experts=1", "model.moe_balance=bias"],
    "deepseek_v3": ["model.attention=mla", "model.kv_lora_rank=8", "model.qk_nope_head_dim=8",
                    "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.n_experts=4", "model.moe_top_k=2",
                    "model.moe_ffn_hidden=16", "model.moe_router=sigmoid", "model.moe_balance=bias"],
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, extra in FAMILIES.items():
        cfg = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.vocab_size=96",
                                 "model.seq_len=16", *extra]).model
        torch.manual_seed(0)
        out[name] = export_hf(build_model(cfg), cfg, root / name)
    return out


@pytest.fixture
def hf(exports, tmp_path):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(exports[name], target)
        return target
    return copy


def to_native(src, tmp_path, capsys, *flags):
    return call(tool("convert_checkpoint").main, ["--to", "native", "--input", str(src), "--output",
                                                  str(tmp_path / "native"), *flags], capsys)


def set_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


UNIMPLEMENTED = [
    ("llama", {"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, "rope_scaling"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0}}, "rope_parameters"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"hidden_act": "relu"}, "hidden_act"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"pretraining_tp": 2}, "pretraining_tp"),
    ("llama", {"sliding_window": 4096}, "sliding_window"),
    ("llama", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("mistral", {"sliding_window": 4096}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("gpt2", {"activation_function": "gelu"}, "activation_function"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ("bert", {"hidden_act": "gelu_new"}, "hidden_act"),
    ("bert", {"hidden_act": "relu"}, "hidden_act"),
    ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ("bert", {"is_decoder": True}, "is_decoder"),
    ("bert", {"add_cross_attention": True}, "add_cross_attention"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters"),
    ("glm4_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
]


@pytest.mark.parametrize("family, fields, name", UNIMPLEMENTED, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in
                                                                     enumerate(UNIMPLEMENTED)])
def test_unimplemented_config_field_is_refused_by_name(hf, tmp_path, capsys, family, fields, name):
    src = hf(family)
    set_config(src, **fields)
    refused(to_native(src, tmp_path, capsys),
            rf"config.json: {name} = .* is not implemented by the converter \(supported: .*\); importing it would "
            r"change the model's outputs")
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("fields, message", [
    ({"n_group": 3}, r"model.moe_n_group \(3\) does not divide model.n_experts \(4\)"),
    ({"n_group": 2, "topk_group": 3}, r"model.moe_topk_group \(3\) exceeds model.moe_n_group \(2\)"),
])
def test_group_routing_a_model_cannot_run_is_refused_at_import(hf, tmp_path, capsys, fields, message):
    src = hf("deepseek_v3")
    set_config(src, **fields)
    refused(to_native(src, tmp_path, capsys), rf"config.json: {message}")
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("extra, message", [
    (["model.n_shared_experts=1"], "a softmax router with shared experts has no Hugging Face counterpart"),
    (["model.moe_balance=both"], "the aux-loss-free selection bias with a softmax router has no Hugging Face"),
    (["model.moe_dense_layers=1"], "Mixtral (a softmax MoE without QK-norm) has no dense layers"),
])
def test_moe_models_without_a_hugging_face_class_are_refused_at_export(tmp_path, extra, message):
    from pretrain.checkpoint.manager import CheckpointError

    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=96",
                             "model.n_experts=4", "model.moe_top_k=2", "model.moe_balance=aux_loss", *extra]).model
    with pytest.raises(CheckpointError, match=re.escape(message)):
        export_hf(build_model(cfg), cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_implemented_spellings_still_import(hf, tmp_path, capsys):
    src = hf("llama")
    set_config(src, hidden_act="silu", rope_scaling=None, attention_bias=False, head_dim=8, pretraining_tp=1)
    code, out, err = to_native(src, tmp_path, capsys)
    assert code == 0, err


@pytest.mark.parametrize("damage, message", [
    ("config_garbage", r"config.json is not valid JSON"),
    ("config_list", r"config.json is not a JSON object"),
    ("config_missing_key", r"config.json lacks 'num_hidden_layers', which a LlamaForCausalLM needs"),
    ("config_wrong_type", r"config.json has a value of the wrong type|must be"),
    ("no_config", r"has no config.json: not a Hugging Face model directory"),
    ("architecture", r"unsupported Hugging Face architecture 'MambaForCausalLM'"),
    ("truncated_weights", r"model.safetensors is unreadable \(truncated or corrupt\?\)"),
    ("no_weights", r"has no weights"),
    ("pickle_only", r"holds only pickled weights \(pytorch_model.bin\); pass --allow-pickle"),
    ("shape", r"weight .* has shape .*, the config implies"),
    ("head_dim_shape", r"weight .*_proj.weight has shape \(\d+, 32\), the config implies \(\d+, 32\)"),
    ("head_dim_odd", r"rotary embeddings need an even head dim; model.head_dim = 7"),
    ("rope_incomplete", r"model.rope_scaling \(llama3\) lacks high_freq_factor, low_freq_factor, "
                        r"original_max_position_embeddings"),
    ("rope_factor", r"model.rope_scaling.factor must be a finite number > 0, got -2"),
    ("rope_unknown_key", r"model.rope_scaling \(linear\) has unknown key\(s\) low_freq_factor"),
])
def test_unreadable_hf_directories(hf, tmp_path, capsys, damage, message):
    src = hf("llama")
    config = json.loads((src / "config.json").read_text())
    if damage == "config_garbage":
        (src / "config.json").write_text("{")
    elif damage == "config_list":
        (src / "config.json").write_text("[]")
    elif damage == "config_missing_key":
        del config["num_hidden_layers"]
        (src / "config.json").write_text(json.dumps(config))
    elif damage == "config_wrong_type":
        set_config(src, hidden_size="thirty-two")
    elif damage == "no_config":
        (src / "config.json").unlink()
    elif damage == "architecture":
        set_config(src, architectures=["MambaForCausalLM"])
    elif damage == "truncated_weights":
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "no_weights":
        (src / "model.safetensors").unlink()
    elif damage == "pickle_only":
        (src / "model.safetensors").unlink()
        (src / "pytorch_model.bin").write_bytes(b"not read")
    elif damage == "shape":
        set_config(src, intermediate_size=config["intermediate_size"] * 2)
    elif damage == "head_dim_shape":
        set_config(src, head_dim=16)
    elif damage == "head_dim_odd":
        set_config(src, head_dim=7)
    elif damage == "rope_incomplete":
        set_config(src, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    elif damage == "rope_factor":
        set_config(src, rope_scaling={"rope_type": "linear", "factor": -2})
    elif damage == "rope_unknown_key":
        set_config(src, rope_scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    refused(to_native(src, tmp_path, capsys), message)
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("dropped", ["model.layers.0.mlp.experts.1.up_proj.weight",
                                     "model.layers.0.mlp.experts.3.down_proj.weight"])
def test_a_missing_expert_piece_is_refused(hf, tmp_path, capsys, dropped):
    """Each HF expert tensor fills one piece of a stacked native weight: every piece must be read."""
    from safetensors.torch import load_file, save_file

    src = hf("glm4_moe")
    weights = load_file(src / "model.safetensors")
    del weights[dropped]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    stacked = "gate_up_proj" if "up_proj" in dropped else "down_proj"
    refused(to_native(src, tmp_path, capsys), rf"lacks weight\(s\) for layers\.0\.mlp\.experts\.{stacked} \(1 missing\)")
    assert not (tmp_path / "native").exists()
