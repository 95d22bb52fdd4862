"""Hugging Face conversion: GPT llama flavour <-> ``LlamaForCausalLM`` (GQA included; ``Qwen3ForCausalLM`` with
``qk_norm``), gpt2 flavour <-> ``GPT2LMHeadModel``, BERT <-> ``BertForMaskedLM``. MoE GPTs: a sigmoid router
(DeepSeek-V3 style: shared experts, dense first layers, the selection bias as ``e_score_correction_bias``) <->
``Glm4MoeForCausalLM`` (full rotary; group-limited routing and the routed scaling factor); a softmax router <->
``Qwen3MoeForCausalLM`` (with ``qk_norm``) or ``MixtralForCausalLM`` (without). Our stacked experts
(``gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I)) are written per expert, as the Hub stores them.

Export writes ``config.json``, ``model.safetensors`` (or shards of at most 5 GB with
``model.safetensors.index.json``) and, when given, the sentencepiece tokenizer with a config ``AutoTokenizer``
loads. Weights are renamed, not copied, except GPT-2's fused q/k/v (concatenated) and its Conv1D layout
(transposed), one layer at a time: peak memory stays about one copy of the weights. Import reads tensor by tensor
through ``safe_open`` into a native model. Pickled ``.bin`` weights are refused unless ``allow_pickle`` (then
read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint.manager import CheckpointError, _not_plain
from pretrain.checkpoint.session import IMPORT_CONFIG
from pretrain.config import ROPE_SCALING, Config, ConfigError, ModelConfig
from pretrain.files import as_os_error, check_output, replace_dir

SHARD_BYTES = 5 * 10 ** 9

LLAMA_NAMES = [(r"^lm_head\.", "lm_head."), (r"^(?!lm_head)", "model.")]
BERT_NAMES = [
    (r"^embeddings\.norm\.", "bert.embeddings.LayerNorm."),
    (r"^embeddings\.", "bert.embeddings."),
    (r"^layers\.(\d+)\.self_attn\.q_proj\.", r"bert.encoder.layer.\1.attention.self.query."),
    (r"^layers\.(\d+)\.self_attn\.k_proj\.", r"bert.encoder.layer.\1.attention.self.key."),
    (r"^layers\.(\d+)\.self_attn\.v_proj\.", r"bert.encoder.layer.\1.attention.self.value."),
    (r"^layers\.(\d+)\.self_attn\.o_proj\.", r"bert.encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.attn_norm\.", r"bert.encoder.layer.\1.attention.output.LayerNorm."),
    (r"^layers\.(\d+)\.mlp\.up_proj\.", r"bert.encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.down_proj\.", r"bert.encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"bert.encoder.layer.\1.output.LayerNorm."),
    (r"^mlm_head\.dense\.", "cls.predictions.transform.dense."),
    (r"^mlm_head\.norm\.", "cls.predictions.transform.LayerNorm."),
    (r"^mlm_head\.bias$", "cls.predictions.bias"),
]
GPT2_NAMES = [
    (r"^embed_tokens\.", "transformer.wte."), (r"^embed_positions\.", "transformer.wpe."),
    (r"^layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
    (r"^layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.ln_2."),
    (r"^layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
    (r"^layers\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^layers\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj."),
    (r"^norm\.", "transformer.ln_f."), (r"^lm_head\.", "lm_head."),
]


def _rename(name: str, table) -> str | None:
    for pattern, replacement in table:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    return None



# --- families: one record per Hugging Face class -------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """What the converter knows of one Hugging Face class: the native model it corresponds to, its config both
    ways, the config fields it implements (anything else that changes the outputs is refused by name), and for
    llama-like MoE classes the names of the MoE block and its experts' (gate, up, down) projections."""

    hf_class: str
    kind: str  # our short name (the key of FAMILIES' values)
    arch: str  # native model.arch
    config_class: str  # the transformers config class
    to_hf: Callable[[ModelConfig], dict]  # config keywords beyond the common ones
    from_hf: Callable[[dict], dict]  # ModelConfig keywords beyond the common ones
    implemented: dict = field(default_factory=dict)  # field -> (accepts(value) -> bool, what is supported)
    holds: Callable[[ModelConfig], str] = lambda cfg: ""  # why this class cannot hold cfg ("" = it can)
    moe: tuple | None = None  # (MoE block name, (gate, up, down) expert projection names)

    @property
    def llama_like(self) -> bool:
        return self.kind not in ("gpt2", "bert")


def _absent_or(*allowed):
    return lambda value: value is None or value in allowed


def _rope_table(raw: dict) -> dict:
    """The HF config's RoPE parameters (4.x ``rope_scaling``, 5.x ``rope_parameters``; transformers 5 lets
    ``rope_scaling`` win when a config has both), one flat dict."""
    table = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    return table if isinstance(table, dict) else {}


def _rope_type(value) -> str:
    if value is None:
        return "default"
    return value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else "?"


def _rope_ok(value) -> bool:
    return _rope_type(value) in ("default", *ROPE_SCALING)


def _full_rotary(raw: dict) -> bool:
    return raw.get("partial_rotary_factor", _rope_table(raw).get("partial_rotary_factor", 1.0)) in (1, 1.0)


def _full_attention(value) -> bool:
    return value is None or isinstance(value, list) and all(v == "full_attention" for v in value)


def _leading_layers(value) -> bool:
    """Qwen3-MoE's mlp_only_layers as our moe_dense_layers: the first k layers, or none."""
    return value is None or isinstance(value, list) and value == list(range(len(value)))


ROPE_SUPPORTED = f'rope_type default, {", ".join(ROPE_SCALING)}'
LLAMA_FIELDS = {  # what llama and its relatives implement; each family adds or overrides
    "hidden_act": (_absent_or("silu", "swish"), "silu"),
    "rope_scaling": (_rope_ok, ROPE_SUPPORTED),
    "rope_parameters": (_rope_ok, ROPE_SUPPORTED),
    "partial_rotary_factor": (_absent_or(1, 1.0), "1.0 (full rotary)"),
    "attention_bias": (_absent_or(False), "false"),
    "mlp_bias": (_absent_or(False), "false"),
    "pretraining_tp": (_absent_or(1), "1"),
    "sliding_window": (_absent_or(), "none"),
    "layer_types": (_full_attention, "full_attention in every layer"),
    "attention_dropout": (_absent_or(0, 0.0), "0"),
}
NO_SLIDING = {"use_sliding_window": (_absent_or(False), "false"), "sliding_window": (lambda v: True, "")}


def _llama_to_hf(cfg: ModelConfig) -> dict:
    """The config keywords every llama-like class shares. RoPE goes in the keywords every transformers release we
    support reads (``rope_theta``, ``rope_scaling``; 5.x folds both into ``rope_parameters``)."""
    positions = max(cfg.seq_len, cfg.max_position_embeddings)
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              rope_theta=cfg.rope_theta, bos_token_id=2, eos_token_id=3, pad_token_id=0, hidden_act="silu",
              attention_dropout=0.0)
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        scaling["rope_type"] = scaling.pop("type", None) or scaling["rope_type"]
        kw["rope_scaling"] = scaling
        if scaling["rope_type"] == "yarn":  # releases before 5.0 read yarn's factor as max_position / original
            positions = max(positions, round(scaling["factor"] * scaling["original_max_position_embeddings"]))
        elif scaling["rope_type"] == "llama3":  # transformers expects the scaled context to exceed the original
            positions = max(positions, scaling["original_max_position_embeddings"])
    kw["max_position_embeddings"] = positions
    return kw


def _llama_from_hf(raw: dict) -> dict:
    heads, width = raw["num_attention_heads"], raw["hidden_size"]
    head_dim = raw.get("head_dim") or 0
    if not isinstance(head_dim, int) or isinstance(head_dim, bool):
        raise TypeError(f"head_dim = {head_dim!r}")
    rope = _rope_table(raw)
    scaling = {}
    if _rope_type(rope) != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta",
                                                              "partial_rotary_factor")}
        scaling["rope_type"] = _rope_type(rope)
        if scaling["rope_type"] == "yarn" and "original_max_position_embeddings" not in scaling:
            scaling["original_max_position_embeddings"] = raw.get("max_position_embeddings")
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    return dict(arch="gpt", flavor="llama", n_layers=raw["num_hidden_layers"], d_model=width, n_heads=heads,
                n_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=0 if head_dim * heads == width else head_dim,
                ffn_hidden=raw["intermediate_size"], vocab_size=raw["vocab_size"],
                seq_len=min(4096, raw.get("max_position_embeddings", 4096)), rope_theta=float(theta),
                max_position_embeddings=raw.get("max_position_embeddings") or 0,  # kept for the export
                rope_scaling=scaling, norm_eps=raw.get("rms_norm_eps", 1e-6),
                tie_embeddings=raw.get("tie_word_embeddings", False))


def _dense(cfg: ModelConfig, *, qk_norm: bool, qkv_bias: bool) -> str:
    if cfg.mla:
        return "it has multi-head latent attention"
    if cfg.n_experts:
        return "it has Mixture-of-Experts layers"
    if cfg.qk_norm != qk_norm:
        return "it has QK-norm" if cfg.qk_norm else "it has no QK-norm"
    if cfg.qkv_bias != qkv_bias:
        return "it has q/k/v biases" if cfg.qkv_bias else "it has no q/k/v biases"
    return ""


def _softmax_moe(cfg: ModelConfig, *, qk_norm: bool) -> str:
    if not cfg.n_experts or cfg.moe_router != "softmax":
        return "it needs softmax-routed Mixture-of-Experts layers"
    if cfg.mla:
        return "it has multi-head latent attention"
    if cfg.moe_n_group > 1 or cfg.moe_routed_scaling != 1:
        return ("group-limited routing and a routed scaling factor have no softmax-routed Hugging Face counterpart: "
                'export needs model.moe_router = "sigmoid" (GLM-4-MoE, DeepSeek-V3)')
    if cfg.n_shared_experts:
        return ("a softmax router with shared experts has no Hugging Face counterpart (Qwen2-MoE gates its shared "
                'expert): export needs model.moe_router = "sigmoid" or no shared experts')
    if cfg.moe_balance != "aux_loss":
        return ("the aux-loss-free selection bias with a softmax router has no Hugging Face counterpart (Qwen3-MoE / "
                'Mixtral route without it): export needs model.moe_router = "sigmoid" or model.moe_balance = '
                '"aux_loss"')
    if cfg.qkv_bias:
        return ("q/k/v biases with a softmax MoE router have no Hugging Face counterpart: export needs "
                'model.moe_router = "sigmoid" (GLM-4-MoE) or model.qkv_bias = false')
    if cfg.qk_norm != qk_norm:
        return "it has QK-norm" if cfg.qk_norm else "it has no QK-norm"
    if not qk_norm and cfg.moe_dense_layers:
        return ("Mixtral (a softmax MoE without QK-norm) has no dense layers: export needs model.moe_dense_layers = 0, "
                "or model.qk_norm = true (Qwen3-MoE)")
    return ""


def _sigmoid_moe(cfg: ModelConfig) -> str:
    """Why GLM-4-MoE's / DeepSeek-V3's router cannot hold ``cfg``'s MoE layers ("" = it can)."""
    if not (cfg.n_experts and cfg.moe_router == "sigmoid"):
        return "it needs sigmoid-routed Mixture-of-Experts layers"
    if cfg.moe_n_group > 1 and cfg.n_experts // cfg.moe_n_group < 2:
        return "its group-limited routing needs two or more experts a group"
    return ""


def _deepseek_to_hf(cfg: ModelConfig) -> dict:
    """DeepSeek-V3's config keywords: MLA's dims, its RoPE over qk_rope_head_dim (interleaved pairs: the converter
    permutes the RoPE rows), the MoE (every layer dense when there are no experts)."""
    kw = dict(head_dim=cfg.qk_rope_head_dim, num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
              kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
              qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_interleave=True,
              attention_bias=False, norm_topk_prob=True, num_nextn_predict_layers=cfg.mtp_depth)
    if cfg.n_experts:
        kw.update(**MOE_KW(cfg), n_routed_experts=cfg.n_experts, moe_intermediate_size=cfg.expert_dim,
                  n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.moe_dense_layers,
                  n_group=cfg.moe_n_group, topk_group=cfg.moe_topk_group,
                  routed_scaling_factor=cfg.moe_routed_scaling)
    else:
        kw.update(first_k_dense_replace=cfg.n_layers, n_routed_experts=1, n_shared_experts=0, n_group=1,
                  topk_group=1, num_experts_per_tok=1, moe_intermediate_size=cfg.ffn_dim, routed_scaling_factor=1.0)
    return kw


def _mtp_layers(raw: dict) -> int:
    """The multi-token-prediction layers a DeepSeek-V3 / GLM-4.5 config names (stored after the last layer)."""
    value = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers")) or 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"num_nextn_predict_layers = {value!r}")
    return value


def _deepseek_from_hf(raw: dict) -> dict:
    kw = dict(attention="mla", head_dim=0, n_kv_heads=0, q_lora_rank=raw.get("q_lora_rank") or 0,
              kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"],
              qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"],
              mtp_depth=_mtp_layers(raw))
    dense = raw.get("first_k_dense_replace") or 0
    if raw.get("n_routed_experts") and dense < raw["num_hidden_layers"]:
        kw.update(**MOE_FROM(raw), n_experts=raw["n_routed_experts"], moe_ffn_hidden=raw["moe_intermediate_size"],
                  n_shared_experts=raw.get("n_shared_experts") or 0, moe_dense_layers=dense, moe_router="sigmoid",
                  moe_balance="bias", **GROUP_ROUTING_FROM(raw))
    return kw


MOE_KW = lambda cfg: dict(num_experts_per_tok=cfg.moe_top_k, output_router_logits=False)  # noqa: E731
MOE_FROM = lambda raw: dict(moe_top_k=raw["num_experts_per_tok"])  # noqa: E731
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
GROUP_ROUTING_FROM = lambda raw: dict(  # noqa: E731  DeepSeek-V3's group-limited routing and routed scaling
    moe_n_group=raw.get("n_group") or 1, moe_topk_group=raw.get("topk_group") or 1,
    moe_routed_scaling=float(raw.get("routed_scaling_factor") or 1.0))

FAMILY_LIST = [
    Family("LlamaForCausalLM", "llama", "gpt", "LlamaConfig",
           to_hf=lambda cfg: dict(attention_bias=False, mlp_bias=False),
           from_hf=lambda raw: {}, implemented=LLAMA_FIELDS,
           holds=lambda cfg: _dense(cfg, qk_norm=False, qkv_bias=False)),
    Family("Qwen2ForCausalLM", "qwen2", "gpt", "Qwen2Config",  # q/k/v biases always (o has none)
           to_hf=lambda cfg: dict(use_sliding_window=False, sliding_window=None),
           from_hf=lambda raw: dict(qkv_bias=True), implemented={**LLAMA_FIELDS, **NO_SLIDING},
           holds=lambda cfg: _dense(cfg, qk_norm=False, qkv_bias=True)),
    Family("Qwen3ForCausalLM", "qwen3", "gpt", "Qwen3Config",
           to_hf=lambda cfg: dict(attention_bias=False, use_sliding_window=False, sliding_window=None),
           from_hf=lambda raw: dict(qk_norm=True), implemented={**LLAMA_FIELDS, **NO_SLIDING},
           holds=lambda cfg: _dense(cfg, qk_norm=True, qkv_bias=False)),
    Family("MistralForCausalLM", "mistral", "gpt", "MistralConfig",  # only as it was imported (Llama otherwise)
           to_hf=lambda cfg: dict(sliding_window=None), from_hf=lambda raw: {}, implemented=LLAMA_FIELDS,
           holds=lambda cfg: _dense(cfg, qk_norm=False, qkv_bias=False)),
    Family("Glm4MoeForCausalLM", "glm4_moe", "gpt", "Glm4MoeConfig",  # attention_bias: q/k/v only
           to_hf=lambda cfg: dict(**MOE_KW(cfg), partial_rotary_factor=1.0, n_routed_experts=cfg.n_experts,
                                  moe_intermediate_size=cfg.expert_dim, n_shared_experts=cfg.n_shared_experts,
                                  first_k_dense_replace=cfg.moe_dense_layers, n_group=cfg.moe_n_group,
                                  topk_group=cfg.moe_topk_group, routed_scaling_factor=cfg.moe_routed_scaling,
                                  norm_topk_prob=True, use_qk_norm=cfg.qk_norm, attention_bias=cfg.qkv_bias,
                                  num_nextn_predict_layers=cfg.mtp_depth),
           from_hf=lambda raw: dict(**MOE_FROM(raw), n_experts=raw["n_routed_experts"],
                                    moe_ffn_hidden=raw["moe_intermediate_size"],
                                    n_shared_experts=raw.get("n_shared_experts") or 0,
                                    qk_norm=bool(raw.get("use_qk_norm")),
                                    qkv_bias=bool(raw.get("attention_bias")),
                                    moe_dense_layers=raw.get("first_k_dense_replace") or 0, moe_router="sigmoid",
                                    moe_balance="bias", mtp_depth=_mtp_layers(raw), **GROUP_ROUTING_FROM(raw)),
           implemented={**LLAMA_FIELDS,
                        "attention_bias": (_absent_or(True, False), "true or false (on q, k and v)"),
                        "norm_topk_prob": (_absent_or(True), "true (top-k weights renormalised)"),
                        "rope_parameters": (lambda v: _rope_ok(v) and _full_rotary({"rope_parameters": v}),
                                            f"{ROPE_SUPPORTED}; partial_rotary_factor 1.0")},
           holds=lambda cfg: "it has multi-head latent attention" if cfg.mla else _sigmoid_moe(cfg),
           moe=("mlp", EXPERT_NAMES)),
    Family("DeepseekV3ForCausalLM", "deepseek_v3", "gpt", "DeepseekV3Config",
           to_hf=lambda cfg: _deepseek_to_hf(cfg), from_hf=lambda raw: _deepseek_from_hf(raw),
           implemented={**LLAMA_FIELDS,
                        "norm_topk_prob": (_absent_or(True), "true (top-k weights renormalised)"),
                        "rope_interleave": (_absent_or(True), "true (DeepSeek's interleaved RoPE pairs)"),
                        "scoring_func": (_absent_or("sigmoid"), "sigmoid"),
                        "topk_method": (_absent_or("noaux_tc"), "noaux_tc (sigmoid scores, group-limited)"),
                        "moe_layer_freq": (_absent_or(1), "1 (every layer after the dense ones)")},
           holds=lambda cfg: "it has no multi-head latent attention" if not cfg.mla else
           "" if not cfg.n_experts else _sigmoid_moe(cfg),
           moe=("mlp", EXPERT_NAMES)),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", "gpt", "Qwen3MoeConfig",
           to_hf=lambda cfg: dict(**MOE_KW(cfg), num_experts=cfg.n_experts, moe_intermediate_size=cfg.expert_dim,
                                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.moe_dense_layers)),
                                  norm_topk_prob=True, router_aux_loss_coef=cfg.moe_aux_coef, attention_bias=False),
           from_hf=lambda raw: dict(**MOE_FROM(raw), n_experts=raw.get("num_experts") or raw["num_local_experts"],
                                    moe_ffn_hidden=raw["moe_intermediate_size"], qk_norm=True,
                                    moe_dense_layers=len(raw.get("mlp_only_layers") or []), moe_router="softmax",
                                    moe_balance="aux_loss"),
           implemented={**LLAMA_FIELDS, **NO_SLIDING,
                        "norm_topk_prob": (_absent_or(True), "true (top-k weights renormalised)"),
                        "decoder_sparse_step": (_absent_or(1), "1"),
                        "mlp_only_layers": (_leading_layers, "the first k layers")},
           holds=lambda cfg: _softmax_moe(cfg, qk_norm=True), moe=("mlp", EXPERT_NAMES)),
    Family("MixtralForCausalLM", "mixtral", "gpt", "MixtralConfig",
           to_hf=lambda cfg: dict(**MOE_KW(cfg), intermediate_size=cfg.expert_dim, num_local_experts=cfg.n_experts,
                                  router_aux_loss_coef=cfg.moe_aux_coef, router_jitter_noise=0.0,
                                  sliding_window=None),  # Mixtral's experts use intermediate_size
           from_hf=lambda raw: dict(**MOE_FROM(raw), n_experts=raw["num_local_experts"],
                                    moe_ffn_hidden=raw["intermediate_size"], moe_router="softmax",
                                    moe_balance="aux_loss"),
           implemented={**LLAMA_FIELDS, "router_jitter_noise": (_absent_or(0, 0.0), "0")},
           holds=lambda cfg: _softmax_moe(cfg, qk_norm=False), moe=("block_sparse_moe", ("w1", "w3", "w2"))),
    Family("GPT2LMHeadModel", "gpt2", "gpt", "GPT2Config",
           to_hf=lambda cfg: dict(
               vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
               n_inner=cfg.ffn_dim, n_positions=cfg.positions, layer_norm_epsilon=cfg.norm_eps,
               activation_function="gelu_new", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
               attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=2, eos_token_id=3),
           from_hf=lambda raw: dict(
               arch="gpt", flavor="gpt2", n_layers=raw["n_layer"], d_model=raw["n_embd"], n_heads=raw["n_head"],
               ffn_hidden=raw.get("n_inner") or 4 * raw["n_embd"], vocab_size=raw["vocab_size"],
               seq_len=raw["n_positions"], max_position_embeddings=raw["n_positions"],
               norm_eps=raw.get("layer_norm_epsilon", 1e-5), tie_embeddings=raw.get("tie_word_embeddings", True)),
           implemented={
               "activation_function": (_absent_or("gelu_new", "gelu_pytorch_tanh"), "gelu_new (tanh GELU)"),
               "scale_attn_weights": (_absent_or(True), "true"),
               "scale_attn_by_inverse_layer_idx": (_absent_or(False), "false"),
               "add_cross_attention": (_absent_or(False), "false")},
           holds=lambda cfg: "" if cfg.flavor == "gpt2" else "it is not the gpt2 flavour"),
    Family("BertForMaskedLM", "bert", "bert", "BertConfig",
           to_hf=lambda cfg: dict(
               vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
               num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim, hidden_act="gelu",
               max_position_embeddings=cfg.positions, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
               hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, tie_word_embeddings=True,
               pad_token_id=0),
           from_hf=lambda raw: dict(
               arch="bert", n_layers=raw["num_hidden_layers"], d_model=raw["hidden_size"],
               n_heads=raw["num_attention_heads"], ffn_hidden=raw["intermediate_size"], vocab_size=raw["vocab_size"],
               seq_len=min(512, raw["max_position_embeddings"]), max_position_embeddings=raw["max_position_embeddings"],
               type_vocab_size=raw.get("type_vocab_size", 2), norm_eps=raw.get("layer_norm_eps", 1e-12),
               tie_embeddings=True),
           implemented={
               "hidden_act": (_absent_or("gelu"), "gelu (erf)"),
               "position_embedding_type": (_absent_or("absolute"), "absolute"),
               "is_decoder": (_absent_or(False), "false"),
               "add_cross_attention": (_absent_or(False), "false")},
           holds=lambda cfg: "" if cfg.arch == "bert" else "it is not a BERT"),
]
FAMILIES: dict[str, Family] = {f.hf_class: f for f in FAMILY_LIST}
BIASED_ROUTERS = ("glm4_moe", "deepseek_v3")  # the families whose routers keep e_score_correction_bias
SUPPORTED = list(FAMILIES)
# export chooses the first of these that holds the model, unless model.hf_architecture names one that does
EXPORT_ORDER = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4MoeForCausalLM",
                "Qwen3MoeForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM"]


def family_of(cfg: ModelConfig) -> Family:
    """The Hugging Face class that holds ``cfg``, or CheckpointError with one line why none does."""
    if cfg.arch == "bert":
        return FAMILIES["BertForMaskedLM"]
    if cfg.flavor == "gpt2":
        return FAMILIES["GPT2LMHeadModel"]
    chosen = FAMILIES.get(cfg.hf_architecture)
    if chosen is not None and chosen.llama_like and not chosen.holds(cfg):
        return chosen
    reasons = []
    for name in EXPORT_ORDER:
        why = FAMILIES[name].holds(cfg)
        if not why:
            return FAMILIES[name]
        reasons.append(why)
    specific = [r for r in reasons if "Hugging Face counterpart" in r or "has no dense layers" in r]
    if specific:
        raise CheckpointError(specific[0])
    features = ", ".join(f for f, on in (("QK-norm", cfg.qk_norm), ("q/k/v biases", cfg.qkv_bias),
                                          ("MoE", cfg.n_experts)) if on)
    raise CheckpointError(f"no Hugging Face class holds a llama-flavour GPT with {features or 'this shape'} "
                          f"(tried {', '.join(EXPORT_ORDER)})")


def hf_kind(cfg: ModelConfig) -> str:
    """The short name of the class ``family_of`` chooses (llama, qwen2, qwen3, mistral, mixtral, ...)."""
    return family_of(cfg).kind


def hf_config(cfg: ModelConfig):
    import transformers

    family = family_of(cfg)
    kw = {**_llama_to_hf(cfg), **family.to_hf(cfg)} if family.llama_like else family.to_hf(cfg)
    return getattr(transformers, family.config_class)(**kw, architectures=[family.hf_class])


def _moe_tensor(name: str, t: torch.Tensor, cfg: ModelConfig, family: Family):
    """(HF name, tensor) pairs of one native MoE-layer tensor, or None when ``name`` is not in an MoE layer."""
    m = re.match(r"^layers\.(\d+)\.mlp\.(gate\.weight|gate\.e_score_correction_bias|experts\.gate_up_proj|"
                 r"experts\.down_proj|shared_experts\..*)$", name)
    if not m or family.moe is None:
        return None
    block, (gate, up, down) = family.moe
    prefix, what, i = f"model.layers.{m.group(1)}.{block}", m.group(2), cfg.expert_dim
    if what == "experts.gate_up_proj":
        return [pair for e in range(t.shape[0]) for pair in ((f"{prefix}.experts.{e}.{gate}.weight", t[e, :i]),
                                                             (f"{prefix}.experts.{e}.{up}.weight", t[e, i:]))]
    if what == "experts.down_proj":
        return [(f"{prefix}.experts.{e}.{down}.weight", t[e]) for e in range(t.shape[0])]
    if what == "gate.e_score_correction_bias" and family.kind not in BIASED_ROUTERS:
        return []  # zero: family_of refused any balance that moves it
    return [(f"{prefix}.{what}", t)]


def _rope_rows(name: str, cfg: ModelConfig) -> tuple[int, int, int] | None:
    """(groups, rows a group, rows before the RoPE part) of an MLA weight whose output rows hold RoPE parts: the
    query's (each head's last qk_rope_head_dim rows) and the kv down-projection's (its last rows, the shared key)."""
    if not cfg.mla:
        return None
    if re.search(r"self_attn\.(q_b_proj|q_proj)\.weight$", name):
        return cfg.n_heads, cfg.qk_head_dim, cfg.qk_nope_head_dim
    if re.search(r"self_attn\.kv_a_proj_with_mqa\.weight$", name):
        return 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    return None


def _permute_rope(t: torch.Tensor, layout: tuple[int, int, int], to_hf: bool) -> torch.Tensor:
    """DeepSeek's interleaved RoPE pairs (2i, 2i+1) <-> our rotate-half halves (i, i + r/2): row j of our RoPE part
    is row ``perm[j]`` of DeepSeek's (evens, then odds), which makes our rotate-half compute DeepSeek's rotation."""
    groups, width, offset = layout
    r = width - offset
    perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
    order = torch.argsort(perm) if to_hf else perm
    w = t.reshape(groups, width, -1)
    return torch.cat([w[:, :offset], w[:, offset:][:, order]], dim=1).reshape(t.shape)


def _mtp_name(name: str, cfg: ModelConfig) -> str | None:
    """A native MTP tensor's name in the model's layer numbering (depth j after the last layer: ``layers.{L+j}.``,
    its final norm as ``shared_head.norm``), or None for any other tensor."""
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if not m:
        return None
    layer, rest = cfg.n_layers + int(m.group(1)), m.group(2)
    rest = rest.removeprefix("block.")
    if rest.startswith("norm."):
        rest = "shared_head." + rest
    return f"layers.{layer}.{rest}"


def to_hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """Yield (HF name, tensor) from a native state dict; renames share storage, GPT-2's fused q/k/v and its
    Conv1D (in, out) layout are built one layer at a time."""
    if cfg.arch == "bert":
        for name, t in state.items():
            hf = _rename(name, BERT_NAMES)
            if hf is not None:  # the pooler / NSP head have no place in BertForMaskedLM
                yield hf, t
        return
    if cfg.flavor == "llama":
        family = family_of(cfg)
        for name, t in state.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if name.startswith("mtp."):
                name = _mtp_name(name, cfg)
            moe = _moe_tensor(name, t, cfg, family)
            layout = _rope_rows(name, cfg)
            if layout is not None:
                t = _permute_rope(t, layout, to_hf=True)
            yield from moe if moe is not None else [(_rename(name, LLAMA_NAMES), t)]
        head = state.get("lm_head.weight", state["embed_tokens.weight"])
        for j in range(cfg.mtp_depth):  # DeepSeek-V3's layout keeps a copy of both in each MTP layer
            yield f"model.layers.{cfg.n_layers + j}.embed_tokens.weight", state["embed_tokens.weight"].clone()
            yield f"model.layers.{cfg.n_layers + j}.shared_head.head.weight", head.clone()
        return
    for name, t in state.items():
        m = re.match(r"^layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            if m.group(2) == "q":  # emit the fused c_attn once, from q, k, v of this layer
                i, kind = m.group(1), m.group(3)
                parts = [state[f"layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
                fused = torch.cat(parts, dim=0)
                yield f"transformer.h.{i}.attn.c_attn.{kind}", fused.t().contiguous() if kind == "weight" else fused
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        hf = _rename(name, GPT2_NAMES)
        conv1d = name.endswith(".weight") and re.search(r"(o_proj|up_proj|down_proj)\.weight$", name)
        yield hf, t.t().contiguous() if conv1d else t


HF_EXPORT_FILES = re.compile(r"^(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|"
                             r"model\.safetensors\.index\.json|tokenizer\.model|tokenizer\.json|"
                             r"tokenizer_config\.json|special_tokens_map\.json|manifest\.json)$")


def is_hf_export(path: Path) -> bool:
    """Whether ``path`` holds only what :func:`export_hf` writes (the only thing ``--overwrite`` may replace)."""
    names = [p.name for p in Path(path).iterdir()]
    return "config.json" in names and all(HF_EXPORT_FILES.match(n) for n in names)


def is_native_import(path: Path) -> bool:
    """Whether ``path`` holds only model-only checkpoints as :func:`save_native` writes them."""
    names = [p.name for p in Path(path).iterdir()]
    return "step-00000000" in names and all(n in ("step-00000000", "latest", IMPORT_CONFIG) for n in names)


def _check_output(out: Path, overwrite: bool, inputs=()) -> Path:
    check_output(out, inputs, overwrite, "Hugging Face export", is_hf_export, CheckpointError)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_hf(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, tokenizer_path: str | Path | None = None,
              overwrite: bool = False, shard_bytes: int = SHARD_BYTES, inputs=(), step: int | None = None) -> Path:
    """Write ``model`` (native, on CPU) as a Hugging Face model directory; returns it. ``inputs`` (the checkpoint
    it came from) may not be, contain or hold the output. ``step``: also write ``manifest.json`` (the step, every
    file's size and CRC-32, as native steps have), last, before the folder is renamed into place."""
    import transformers

    out = Path(out_dir)
    tmp = _check_output(out, overwrite, [*inputs, *([tokenizer_path] if tokenizer_path else [])])
    try:
        config = hf_config(cfg)
        config.save_pretrained(tmp)
        if cfg.arch == "gpt":
            transformers.GenerationConfig.from_model_config(config).save_pretrained(tmp)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in to_hf_tensors(model.state_dict(), cfg):
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.detach().contiguous()
            size += nbytes
        if len(shards) == 1:
            _save_safetensors(shards[0], tmp / "model.safetensors", out)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _save_safetensors(shard, tmp / file, out)
                weight_map.update({name: file for name in shard})
                total += sum(t.numel() * t.element_size() for t in shard.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if tokenizer_path:
            write_tokenizer(Path(tokenizer_path), tmp, cfg)
        if step is not None:
            from pretrain.checkpoint.manifest import write_manifest

            write_manifest(tmp, step)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_safetensors(tensors: dict, file: Path, out: Path) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except Exception as exc:  # safetensors reports a full disk as its own error type
        raise as_os_error(exc, out) from exc


def write_tokenizer(model_file: Path, out: Path, cfg: ModelConfig) -> None:
    """The run's tokenizer as ``AutoTokenizer`` loads it: our sentencepiece model as a slow LlamaTokenizer, or a
    Hugging Face ``tokenizer.json`` (data prepared with an imported model's tokenizer) as it came."""
    from pretrain.data.tokenizer import HFTokenizer, Tokenizer

    tok = Tokenizer.load(model_file)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {model_file} has {tok.vocab_size} pieces, more than the model's vocab "
                              f"({cfg.vocab_size})")
    if isinstance(tok, HFTokenizer):
        (out / "tokenizer.json").write_bytes(tok.proto)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.seq_len,
                  **{f"{k}_token": v for k, v in tok.specials.items()}}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        return
    shutil.copy(model_file, out / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": cfg.seq_len,
              "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


# --- import -----------------------------------------------------------------------------------------------
def native_config(hf_dir: Path) -> tuple[ModelConfig, dict]:
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    arch = (raw.get("architectures") or [None])[0]
    if arch not in FAMILIES:
        raise CheckpointError(f"unsupported Hugging Face architecture {arch!r}: supported are "
                              f"{', '.join(SUPPORTED)}")
    family = FAMILIES[arch]
    _refuse_unimplemented(raw, family, config_file)
    try:
        kw = {**_llama_from_hf(raw), **family.from_hf(raw)} if family.llama_like else family.from_hf(raw)
        cfg = ModelConfig(**kw, hf_architecture=arch if family.llama_like else "")
        Config(model=cfg).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    except KeyError as exc:
        raise CheckpointError(f"{config_file} lacks {exc.args[0]!r}, which a {arch} needs") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file} has a value of the wrong type ({exc})") from None
    return cfg, raw


def _refuse_unimplemented(raw: dict, family: Family, config_file: Path) -> None:
    """Config fields that change what the model computes, with values our models do not implement, are refused by
    name rather than dropped (an import that loads but computes something else is the worst outcome). Fields that
    only affect speed, memory or generation defaults are not listed."""
    for key, (accepts, supported) in family.implemented.items():
        if key in raw and not accepts(raw[key]):
            raise CheckpointError(f"{config_file}: {key} = {json.dumps(raw[key])} is not implemented by the converter "
                                  f"(supported: {supported}); importing it would change the model's outputs")


def _weight_files(hf_dir: Path, allow_pickle: bool) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a weight index ({type(exc).__name__})") from None
        for name in sorted(names):
            if not isinstance(name, str) or Path(name).is_absolute() or len(Path(name).parts) != 1 \
                    or (hf_dir / name).is_symlink():
                raise CheckpointError(f"{index} lists {name!r}, not a file of {hf_dir}: not read")
        files = sorted(hf_dir / name for name in names)
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif (hf_dir / "pytorch_model.bin").is_file():
        if not allow_pickle:
            raise CheckpointError(f"{hf_dir} holds only pickled weights (pytorch_model.bin); pass --allow-pickle to "
                                  "read them with torch.load(weights_only=True)")
        files = [hf_dir / "pytorch_model.bin"]
    else:
        raise CheckpointError(f"{hf_dir} has no weights (model.safetensors, its index, or pytorch_model.bin)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{hf_dir}: weight file {missing[0]} listed in the index is missing")
    return files


def _holds_layer(files: list[Path], layer: int) -> bool:
    """Whether the weight files hold any tensor of ``model.layers.{layer}`` (safetensors headers only)."""
    from safetensors import safe_open

    prefix = f"model.layers.{layer}."
    for file in files:
        if file.suffix == ".bin":
            return True  # pickled weights: read whole later, not scanned here
        try:
            with safe_open(str(file), framework="pt") as f:
                if any(name.startswith(prefix) for name in f.keys()):
                    return True
        except Exception as exc:
            raise CheckpointError(f"{file.name} is unreadable (truncated or corrupt?): {exc}") from None
    return False


def _read_tensors(files: list[Path]):
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".bin":
            try:
                weights = torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{file} {_not_plain(exc)}") from None
            yield from weights.items()
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as exc:  # truncated or corrupt files surface as SafetensorError / OSError
            raise CheckpointError(f"{file.name} is unreadable (truncated or corrupt?): {exc}") from None


FP8_FORMATS = {"e4m3": torch.float8_e4m3fn}  # DeepSeek-V3's Hub weights


def fp8_blocks(raw: dict, config_file: Path) -> tuple[int, int] | None:
    """The (rows, columns) blocks of a block-wise fp8 checkpoint (``quantization_config``: ``quant_method = "fp8"``,
    ``fmt = "e4m3"``, ``weight_block_size``: DeepSeek-V3's Hub weights, each fp8 weight with a
    ``weight_scale_inv`` of one fp32 scale a block), None for an unquantized one; any other quantization is refused
    by name (read as plain weights it would load and compute something else)."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "fp8":
        raise CheckpointError(f"{config_file}: quantization_config.quant_method = {json.dumps(method)} is not read by "
                              "the converter (only block-wise fp8, DeepSeek-V3's): dequantize the weights first")
    fmt = qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size")
    if fmt not in FP8_FORMATS:
        raise CheckpointError(f"{config_file}: quantization_config.fmt = {json.dumps(fmt)} is not read by the "
                              f"converter (supported: {', '.join(FP8_FORMATS)})")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{config_file}: quantization_config.weight_block_size = {json.dumps(block)} is not two "
                              "positive integers: only block-wise fp8 (one scale a block, weight_scale_inv) is read")
    return block[0], block[1]


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """fp32 weight = fp8 weight × its block's scale (``weight_scale_inv``: (⌈rows / br⌉, ⌈columns / bc⌉), the last
    blocks cut at the edges), as DeepSeek's own ``weight_dequant`` computes it (before its cast to bf16)."""
    rows, cols = weight.shape if weight.dim() == 2 else (0, 0)
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if weight.dim() != 2 or tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"{name}: an fp8 weight {tuple(weight.shape)} with {block[0]}×{block[1]} blocks takes a "
                              f"weight_scale_inv of {grid}, got {tuple(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _dequantized(tensors, block: tuple[int, int] | None, config_file: Path):
    """The weights with every fp8 one (and its ``weight_scale_inv``, wherever it lies in the files) replaced by its
    fp32 value; an fp8 weight without its scale, a scale without its weight, or fp8 weights in an unquantized
    checkpoint: one line."""
    fp8 = tuple(FP8_FORMATS.values()) + (torch.float8_e5m2,)
    weights, scales = {}, {}
    for name, tensor in tensors:
        is_scale, is_fp8 = name.endswith(".weight_scale_inv"), tensor.dtype in fp8
        if block is None and (is_scale or is_fp8):
            raise CheckpointError(f"{name} is an fp8 weight or its scale, but {config_file} has no quantization_config")
        if is_scale:
            base = name.removesuffix("_scale_inv")
            if base in weights:
                yield base, _dequantize(weights.pop(base), tensor, block, base)
            else:
                scales[base] = tensor
        elif is_fp8:
            if tensor.dtype != FP8_FORMATS["e4m3"]:
                raise CheckpointError(f"{name} is {tensor.dtype}; the fp8 checkpoints read are e4m3")
            if name in scales:
                yield name, _dequantize(tensor, scales.pop(name), block, name)
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights:
        raise CheckpointError(f"fp8 weight {sorted(weights)[0]} has no {sorted(weights)[0]}_scale_inv in the "
                              f"weight files ({len(weights)} without)")
    if scales:
        raise CheckpointError(f"{sorted(scales)[0]}_scale_inv scales no fp8 weight of the weight files")


def import_hf(hf_dir: str | Path, allow_pickle: bool = False, say=None) -> tuple[torch.nn.Module, ModelConfig]:
    """A native model (CPU, fp32 as stored) with the weights of a Hugging Face directory (block-wise fp8 weights,
    DeepSeek-V3's Hub format, dequantized to fp32: ``fp8_blocks``). Multi-token-prediction
    layers the config names (``num_nextn_predict_layers``) come along; if the weights hold none (transformers saves
    without them), the model imports with ``mtp_depth = 0`` and ``say`` (default: stderr) is told in one line."""
    import dataclasses
    import sys

    from pretrain.models import build_model

    hf_dir = Path(hf_dir)
    cfg, raw = native_config(hf_dir)
    block = fp8_blocks(raw, hf_dir / "config.json")
    files = _weight_files(hf_dir, allow_pickle)
    if cfg.mtp_depth and not _holds_layer(files, cfg.n_layers):
        (say or (lambda line: print(line, file=sys.stderr)))(
            f"note: {hf_dir / 'config.json'} names {cfg.mtp_depth} multi-token-prediction layer(s) but the weights "
            f"hold none (model.layers.{cfg.n_layers}.*): imported with model.mtp_depth = 0")
        cfg = dataclasses.replace(cfg, mtp_depth=0)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # rotary tables; every weight is overwritten below
    expected = dict(model.state_dict())
    reverse = _reverse_names(expected, cfg)
    read = set()  # (native name, piece): piece None for a whole tensor, (expert, first row) for a stacked expert's
    with torch.no_grad():
        for name, tensor in _dequantized(_read_tensors(files), block, hf_dir / "config.json"):
            if name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias") or "rotary" in name \
                    or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias") \
                    or name.endswith("position_ids") or name.startswith(("bert.pooler", "cls.seq_relationship")):
                continue  # tied copies, buffers, heads BertForMaskedLM does not use
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            extra_layer = re.match(r"^model\.layers\.(\d+)\.", name)
            if extra_layer and int(extra_layer.group(1)) >= cfg.n_layers and \
                    (int(extra_layer.group(1)) >= cfg.n_layers + cfg.mtp_depth
                     or name.endswith((".embed_tokens.weight", ".shared_head.head.weight"))):
                continue  # MTP layers beyond the config's, and the copies of the embedding and head they keep
            if name not in reverse and tensor.numel() == 0:
                continue  # GLM-4-MoE without shared experts stores them with zero width
            if name not in reverse:
                raise CheckpointError(f"unexpected weight {name!r} for a {cfg.arch}/{cfg.flavor} model")
            for target, convert, *part in reverse[name]:  # part: (expert, rows) of a stacked expert weight
                value = convert(tensor)
                dest = expected[target] if not part else expected[target][part[0][0], part[0][1]]
                if dest.shape != value.shape:
                    raise CheckpointError(f"weight {name} has shape {tuple(tensor.shape)}, the config implies "
                                          f"{tuple(dest.shape)}")
                dest.copy_(value)
                read.add((target, _piece(part)))
    wanted = {(target, _piece(part)) for entries in reverse.values() for target, _, *part in entries}
    seen = {t for t, _ in read} - {t for t, _ in wanted - read}  # a stacked weight counts once every piece is read
    not_in_hf = {k for k in expected if k.endswith("e_score_correction_bias") and hf_kind(cfg) not in BIASED_ROUTERS}
    missing = sorted(set(expected) - seen - ({"lm_head.weight"} if cfg.tie_embeddings else set()) - not_in_hf
                     - {k for k in expected if k.startswith(("pooler", "nsp_head"))})
    if missing:
        raise CheckpointError(f"{hf_dir} lacks weight(s) for {missing[0]} ({len(missing)} missing)")
    return model.eval(), cfg


def _piece(part: list) -> tuple | None:
    return (part[0][0], part[0][1].start) if part else None


def _reverse_names(expected: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, list]:
    """HF name -> [(native name, converter)]."""
    reverse: dict[str, list] = {}
    same = lambda t: t  # noqa: E731
    if cfg.arch == "bert" or cfg.flavor == "llama":
        table = BERT_NAMES if cfg.arch == "bert" else LLAMA_NAMES
        family = family_of(cfg) if cfg.arch == "gpt" else None
        for name, value in expected.items():
            hf_like = _mtp_name(name, cfg) or name  # MTP tensors in the layer numbering, then as any layer's
            moe = _moe_tensor(hf_like, value, cfg, family) if family else None
            if moe is None:
                hf = _rename(hf_like, table)
                layout = _rope_rows(name, cfg)
                convert = same if layout is None else lambda t, lay=layout: _permute_rope(t, lay, to_hf=False)
                if hf is not None:
                    reverse.setdefault(hf, []).append((name, convert))
                continue
            i = cfg.expert_dim
            rows = {0: slice(0, i), 1: slice(i, 2 * i)} if name.endswith("gate_up_proj") else {0: slice(None)}
            for n, (hf, _) in enumerate(moe):
                if name.endswith(("gate_up_proj", "down_proj")):  # one piece of the stacked weight per HF tensor
                    expert, which = divmod(n, len(rows))
                    reverse.setdefault(hf, []).append((name, same, (expert, rows[which])))
                else:
                    reverse.setdefault(hf, []).append((name, same))
        return reverse
    d = cfg.d_model
    for name in expected:
        m = re.match(r"^layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            i, which, kind = m.group(1), "qkv".index(m.group(2)), m.group(3)
            if kind == "weight":
                conv = lambda t, w=which: t.t()[w * d:(w + 1) * d].contiguous()  # noqa: E731
            else:
                conv = lambda t, w=which: t[w * d:(w + 1) * d].contiguous()  # noqa: E731
            reverse.setdefault(f"transformer.h.{i}.attn.c_attn.{kind}", []).append((name, conv))
            continue
        hf = _rename(name, GPT2_NAMES)
        conv1d = re.search(r"(o_proj|up_proj|down_proj)\.weight$", name)
        reverse.setdefault(hf, []).append((name, (lambda t: t.t().contiguous()) if conv1d else same))
    return reverse


def require_transformers(what: str) -> None:
    """ImportError-free check that the ``hf`` extra is installed; CheckpointError naming it otherwise."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise CheckpointError(f"{what} needs transformers: pip install -e '.[hf]'")


def run_tokenizer(cfg: Config, explicit: str | None = None) -> Path | None:
    """The tokenizer a run trained with (``data.tokenizer``, else the one its prepared data names), if any."""
    if explicit:
        return Path(explicit)
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        return Path(cfg.data.tokenizer)
    if cfg.data.path:
        try:
            name = json.loads((Path(cfg.data.path) / "manifest.json").read_text()).get("tokenizer", "tokenizer.model")
        except (OSError, ValueError, AttributeError):
            name = "tokenizer.model"
        candidate = Path(cfg.data.path) / str(name)
        if candidate.is_file():
            return candidate
    return None


def write_hf_copy(step_dir: Path, out: Path, tokenizer: Path | None) -> Path:
    """The Hugging Face copy of a complete native step (``checkpoint.hf_interval`` / ``hf_at_end``), on one
    process: the step is read back through DCP, which gathers whatever layout wrote it (FSDP shards, TP, pipeline
    stages), so every layout writes the same folder. Atomic like any export: a crash leaves at most a hidden
    temporary folder, and an earlier good copy is replaced only once the new one is complete."""
    from pretrain.checkpoint import load_model
    from pretrain.checkpoint.manager import verify

    verify(step_dir)
    model, cfg = load_model(step_dir)
    step = json.loads((step_dir / "state.json").read_text())["step"]
    return export_hf(model, cfg.model, out, tokenizer, overwrite=True, inputs=[step_dir], step=int(step))


def continue_config(cfg: ModelConfig, step: Path) -> str:
    """A training config that continues pretraining the imported ``step``: its model, resume from it, and a data
    section the user must fill in (a run refuses to start until ``data.path`` is set)."""
    run = Config(model=cfg)
    run.data.source, run.data.path = "shards", ""
    run.checkpoint.resume = str(step.resolve())
    run.checkpoint.interval = 1000
    run.logging.run_dir = f"runs/{step.parent.name}"
    run.schedule.warmup_steps = 100
    run.parallel.sequence_parallel = not cfg.tie_embeddings  # SP needs an untied head (Llama 3.2 ties it)
    return (f"# Continue pretraining {cfg.hf_architecture or cfg.arch} imported to {step.resolve()}.\n"
            "# Set data.path (a directory from tools/prepare_data.py, prepared with this model's tokenizer) and the\n"
            "# run's length / learning rate; the parallel layout comes from --set parallel.* or the planner.\n"
            f"{run.to_toml()}")


def save_native(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, overwrite: bool = False,
                inputs=()) -> Path:
    """A model-only native checkpoint (step 0) of ``model``: the start of a run that continues pretraining, with
    the training config to continue it (``train.toml``) beside it. Written beside ``out_dir`` and renamed into
    place; an earlier import there is replaced only at the end."""
    from pretrain.checkpoint.manager import CheckpointManager, step_dir_name

    out = Path(out_dir)
    check_output(out, inputs, overwrite, "model-only checkpoint (--to native)", is_native_import, CheckpointError)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        CheckpointManager(tmp).save(0, model, None, {"model_only": True}, Config(model=cfg).to_toml())
        (tmp / IMPORT_CONFIG).write_text(continue_config(cfg, out / step_dir_name(0)))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / step_dir_name(0)
