"""Hugging Face conversion: GPT llama flavour <-> ``LlamaForCausalLM`` (GQA included; ``Qwen3ForCausalLM`` with
``qk_norm``), gpt2 flavour <-> ``GPT2LMHeadModel``, BERT <-> ``BertForMaskedLM``. MoE GPTs: a sigmoid router
(DeepSeek-V3 style: shared experts, dense first layers, the selection bias as ``e_score_correction_bias``) <->
``Glm4MoeForCausalLM`` (full rotary, one expert group, routed scaling 1); a softmax router <->
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
import re
import shutil
from pathlib import Path

import torch

from pretrain.checkpoint.manager import CheckpointError
from pretrain.config import Config, ConfigError, ModelConfig
from pretrain.files import as_os_error, check_output, replace_dir

SUPPORTED = {"LlamaForCausalLM": ("gpt", "llama"), "GPT2LMHeadModel": ("gpt", "gpt2"), "BertForMaskedLM": ("bert", ""),
             "Qwen3ForCausalLM": ("gpt", "qwen3"), "MixtralForCausalLM": ("gpt", "mixtral"),
             "Qwen3MoeForCausalLM": ("gpt", "qwen3_moe"), "Glm4MoeForCausalLM": ("gpt", "glm4_moe")}
# per HF llama-like class: the MoE block's name and its experts' (gate, up, down) names
MOE_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
             "glm4_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
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


def hf_config(cfg: ModelConfig):
    import transformers

    if cfg.arch == "bert":
        return transformers.BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim, hidden_act="gelu",
            max_position_embeddings=cfg.positions, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, tie_word_embeddings=True,
            architectures=["BertForMaskedLM"], pad_token_id=0)
    if cfg.flavor == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.ffn_dim, n_positions=cfg.positions, layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings, architectures=["GPT2LMHeadModel"], bos_token_id=2,
            eos_token_id=3)
    return _llama_like_config(cfg, hf_kind(cfg))


def hf_kind(cfg: ModelConfig) -> str:
    """Which llama-like HF class (a key of SUPPORTED's flavours) holds a llama-flavour GPT, or one line why none."""
    if not cfg.n_experts:
        return "qwen3" if cfg.qk_norm else "llama"
    if cfg.moe_router == "sigmoid":
        return "glm4_moe"
    if cfg.n_shared_experts:
        raise CheckpointError("a softmax router with shared experts has no Hugging Face counterpart (Qwen2-MoE gates "
                              'its shared expert): export needs model.moe_router = "sigmoid" or no shared experts')
    if cfg.moe_balance != "aux_loss":
        raise CheckpointError("the aux-loss-free selection bias with a softmax router has no Hugging Face counterpart "
                              '(Qwen3-MoE / Mixtral route without it): export needs model.moe_router = "sigmoid" or '
                              'model.moe_balance = "aux_loss"')
    if cfg.qk_norm:
        return "qwen3_moe"
    if cfg.moe_dense_layers:
        raise CheckpointError("Mixtral (a softmax MoE without QK-norm) has no dense layers: export needs "
                              "model.moe_dense_layers = 0, or model.qk_norm = true (Qwen3-MoE)")
    return "mixtral"


def _llama_like_config(cfg: ModelConfig, kind: str):
    """The HF config of a llama-flavour GPT as ``kind`` (``hf_kind``). RoPE goes in the keyword every transformers
    release we support reads (``rope_theta``; 5.x folds it into ``rope_parameters``)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(cfg.seq_len, cfg.max_position_embeddings), rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta, bos_token_id=2, eos_token_id=3,
        pad_token_id=0, hidden_act="silu", attention_dropout=0.0)
    if kind == "llama":
        return transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False,
                                        architectures=["LlamaForCausalLM"])
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=cfg.head_dim, attention_bias=False,
                                        architectures=["Qwen3ForCausalLM"])
    moe = dict(num_experts_per_tok=cfg.moe_top_k, output_router_logits=False)
    if kind == "mixtral":
        common["intermediate_size"] = cfg.expert_dim  # Mixtral's experts use intermediate_size
        return transformers.MixtralConfig(**common, **moe, head_dim=cfg.head_dim, num_local_experts=cfg.n_experts,
                                          router_aux_loss_coef=cfg.moe_aux_coef, router_jitter_noise=0.0,
                                          architectures=["MixtralForCausalLM"])
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, **moe, num_experts=cfg.n_experts,
                                           moe_intermediate_size=cfg.expert_dim, decoder_sparse_step=1,
                                           mlp_only_layers=list(range(cfg.moe_dense_layers)), norm_topk_prob=True,
                                           router_aux_loss_coef=cfg.moe_aux_coef, attention_bias=False,
                                           architectures=["Qwen3MoeForCausalLM"])
    return transformers.Glm4MoeConfig(**common, **moe, partial_rotary_factor=1.0, n_routed_experts=cfg.n_experts,
                                      moe_intermediate_size=cfg.expert_dim, n_shared_experts=cfg.n_shared_experts,
                                      first_k_dense_replace=cfg.moe_dense_layers, n_group=1, topk_group=1,
                                      routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=cfg.qk_norm,
                                      attention_bias=False, architectures=["Glm4MoeForCausalLM"])


def _moe_tensor(name: str, t: torch.Tensor, cfg: ModelConfig, kind: str):
    """(HF name, tensor) pairs of one native MoE-layer tensor, or None when ``name`` is not in an MoE layer."""
    m = re.match(r"^layers\.(\d+)\.mlp\.(gate\.weight|gate\.e_score_correction_bias|experts\.gate_up_proj|"
                 r"experts\.down_proj|shared_experts\..*)$", name)
    if not m or kind not in MOE_NAMES:
        return None
    block, (gate, up, down) = MOE_NAMES[kind]
    prefix, what, i = f"model.layers.{m.group(1)}.{block}", m.group(2), cfg.expert_dim
    if what == "experts.gate_up_proj":
        return [pair for e in range(t.shape[0]) for pair in ((f"{prefix}.experts.{e}.{gate}.weight", t[e, :i]),
                                                             (f"{prefix}.experts.{e}.{up}.weight", t[e, i:]))]
    if what == "experts.down_proj":
        return [(f"{prefix}.experts.{e}.{down}.weight", t[e]) for e in range(t.shape[0])]
    if what == "gate.e_score_correction_bias" and kind != "glm4_moe":
        return []  # zero: hf_kind refused any balance that moves it
    return [(f"{prefix}.{what}", t)]


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
        kind = hf_kind(cfg)
        for name, t in state.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            moe = _moe_tensor(name, t, cfg, kind)
            yield from moe if moe is not None else [(_rename(name, LLAMA_NAMES), t)]
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
                             r"tokenizer_config\.json|special_tokens_map\.json)$")


def is_hf_export(path: Path) -> bool:
    """Whether ``path`` holds only what :func:`export_hf` writes (the only thing ``--overwrite`` may replace)."""
    names = [p.name for p in Path(path).iterdir()]
    return "config.json" in names and all(HF_EXPORT_FILES.match(n) for n in names)


def is_native_import(path: Path) -> bool:
    """Whether ``path`` holds only model-only checkpoints as :func:`save_native` writes them."""
    names = [p.name for p in Path(path).iterdir()]
    return "step-00000000" in names and all(n in ("step-00000000", "latest") for n in names)


def _check_output(out: Path, overwrite: bool, inputs=()) -> Path:
    check_output(out, inputs, overwrite, "Hugging Face export", is_hf_export, CheckpointError)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_hf(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, tokenizer_path: str | Path | None = None,
              overwrite: bool = False, shard_bytes: int = SHARD_BYTES, inputs=()) -> Path:
    """Write ``model`` (native, on CPU) as a Hugging Face model directory; returns it. ``inputs`` (the checkpoint
    it came from) may not be, contain or hold the output."""

    out = Path(out_dir)
    tmp = _check_output(out, overwrite, [*inputs, *([tokenizer_path] if tokenizer_path else [])])
    try:
        hf_config(cfg).save_pretrained(tmp)
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
    """Our sentencepiece model as a slow LlamaTokenizer / BertTokenizer-free setup AutoTokenizer loads."""
    from pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer.load(model_file)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {model_file} has {tok.vocab_size} pieces, more than the model's vocab "
                              f"({cfg.vocab_size})")
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
    if arch not in SUPPORTED:
        raise CheckpointError(f"unsupported Hugging Face architecture {arch!r}: supported are "
                              f"{', '.join(SUPPORTED)}")
    family, flavor = SUPPORTED[arch]
    _refuse_unimplemented(raw, "bert" if family == "bert" else flavor, config_file)
    try:
        cfg = _model_config(raw, family, flavor)
        Config(model=cfg).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    except KeyError as exc:
        raise CheckpointError(f"{config_file} lacks {exc.args[0]!r}, which a {arch} needs") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file} has a value of the wrong type ({exc})") from None
    return cfg, raw


def _model_config(raw: dict, family: str, flavor: str) -> ModelConfig:
    if family == "bert":
        cfg = ModelConfig(arch="bert", n_layers=raw["num_hidden_layers"], d_model=raw["hidden_size"],
                          n_heads=raw["num_attention_heads"], ffn_hidden=raw["intermediate_size"],
                          vocab_size=raw["vocab_size"], seq_len=min(512, raw["max_position_embeddings"]),
                          max_position_embeddings=raw["max_position_embeddings"],
                          type_vocab_size=raw.get("type_vocab_size", 2), norm_eps=raw.get("layer_norm_eps", 1e-12),
                          tie_embeddings=True)
    elif flavor == "gpt2":
        d = raw["n_embd"]
        cfg = ModelConfig(arch="gpt", flavor="gpt2", n_layers=raw["n_layer"], d_model=d, n_heads=raw["n_head"],
                          ffn_hidden=raw.get("n_inner") or 4 * d, vocab_size=raw["vocab_size"],
                          seq_len=raw["n_positions"], max_position_embeddings=raw["n_positions"],
                          norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                          tie_embeddings=raw.get("tie_word_embeddings", True))
    else:
        cfg = _llama_like_model_config(raw, flavor)
    return cfg


def _rope_theta(raw: dict) -> float:
    return float(raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)))


def _llama_like_model_config(raw: dict, kind: str) -> ModelConfig:
    """Llama, Qwen3, Mixtral, Qwen3-MoE and GLM-4-MoE configs as a llama-flavour GPT (the fields that would change
    the computation were checked by ``_refuse_unimplemented`` first)."""
    common = dict(arch="gpt", flavor="llama", n_layers=raw["num_hidden_layers"], d_model=raw["hidden_size"],
                  n_heads=raw["num_attention_heads"],
                  n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                  ffn_hidden=raw["intermediate_size"], vocab_size=raw["vocab_size"],
                  seq_len=min(4096, raw.get("max_position_embeddings", 4096)), rope_theta=_rope_theta(raw),
                  norm_eps=raw.get("rms_norm_eps", 1e-6), tie_embeddings=raw.get("tie_word_embeddings", False))
    if kind in ("llama", "qwen3"):
        return ModelConfig(**common, qk_norm=kind == "qwen3")
    moe = dict(moe_top_k=raw["num_experts_per_tok"])
    if kind == "mixtral":
        return ModelConfig(**common, **moe, n_experts=raw["num_local_experts"], moe_ffn_hidden=raw["intermediate_size"],
                           moe_router="softmax", moe_balance="aux_loss")
    if kind == "qwen3_moe":
        return ModelConfig(**common, **moe, n_experts=raw.get("num_experts") or raw["num_local_experts"],
                           moe_ffn_hidden=raw["moe_intermediate_size"], qk_norm=True,
                           moe_dense_layers=len(raw.get("mlp_only_layers") or []), moe_router="softmax",
                           moe_balance="aux_loss")
    return ModelConfig(**common, **moe, n_experts=raw["n_routed_experts"], moe_ffn_hidden=raw["moe_intermediate_size"],
                       n_shared_experts=raw.get("n_shared_experts") or 0, qk_norm=bool(raw.get("use_qk_norm")),
                       moe_dense_layers=raw.get("first_k_dense_replace") or 0, moe_router="sigmoid",
                       moe_balance="bias")


def _leading_layers(value) -> bool:
    """Qwen3-MoE's mlp_only_layers as our moe_dense_layers: the first k layers, or none."""
    return value is None or isinstance(value, list) and value == list(range(len(value)))


def _full_rotary(raw: dict) -> bool:
    factor = raw.get("partial_rotary_factor", (raw.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    return factor in (1, 1.0)


def _absent_or(*allowed):
    return lambda value: value is None or value in allowed


def _default_rope(value) -> bool:
    return value is None or isinstance(value, dict) and value.get("rope_type", value.get("type", "default")) == "default"


# Config fields that change what the model computes, per family, with the values our models implement: anything
# else is refused by name rather than dropped (an import that loads but computes something else is the worst
# outcome). Fields that only affect speed, memory or generation defaults are not listed.
IMPLEMENTED: dict[str, dict[str, tuple]] = {
    "llama": {
        "hidden_act": (_absent_or("silu", "swish"), "silu"),
        "rope_scaling": (_default_rope, "none (plain RoPE)"),
        "rope_parameters": (_default_rope, 'rope_type "default"'),
        "attention_bias": (_absent_or(False), "false"),
        "mlp_bias": (_absent_or(False), "false"),
        "pretraining_tp": (_absent_or(1), "1"),
        "sliding_window": (_absent_or(), "none"),
        "attention_dropout": (_absent_or(0, 0.0), "0"),
        "head_dim": (None, "hidden_size / num_attention_heads"),  # checked below against the two
    },
    "qwen3": {},  # the llama fields, filled in below
    "mixtral": {"router_jitter_noise": (_absent_or(0, 0.0), "0")},
    "qwen3_moe": {
        "norm_topk_prob": (_absent_or(True), "true (top-k weights renormalised)"),
        "decoder_sparse_step": (_absent_or(1), "1"),
        "mlp_only_layers": (_leading_layers, "the first k layers"),
        "use_sliding_window": (_absent_or(False), "false"),
    },
    "glm4_moe": {
        "norm_topk_prob": (_absent_or(True), "true (top-k weights renormalised)"),
        "routed_scaling_factor": (_absent_or(1, 1.0), "1.0"),
        "n_group": (_absent_or(1), "1 (no group-limited routing)"),
        "topk_group": (_absent_or(1), "1"),
        "partial_rotary_factor": (_absent_or(1, 1.0), "1.0 (full rotary)"),
        "rope_parameters": (lambda v: _default_rope(v) and _full_rotary({"rope_parameters": v}),
                            'rope_type "default", partial_rotary_factor 1.0'),
    },
    "gpt2": {
        "activation_function": (_absent_or("gelu_new", "gelu_pytorch_tanh"), "gelu_new (tanh GELU)"),
        "scale_attn_weights": (_absent_or(True), "true"),
        "scale_attn_by_inverse_layer_idx": (_absent_or(False), "false"),
        "add_cross_attention": (_absent_or(False), "false"),
    },
    "bert": {
        "hidden_act": (_absent_or("gelu"), "gelu (erf)"),
        "position_embedding_type": (_absent_or("absolute"), "absolute"),
        "is_decoder": (_absent_or(False), "false"),
        "add_cross_attention": (_absent_or(False), "false"),
    },
}


for _kind in ("qwen3", "mixtral", "qwen3_moe", "glm4_moe"):  # llama's fields hold for its relatives too
    IMPLEMENTED[_kind] = {**IMPLEMENTED["llama"], **IMPLEMENTED[_kind]}


def _refuse_unimplemented(raw: dict, family: str, config_file: Path) -> None:
    for key, (accepts, supported) in IMPLEMENTED[family].items():
        if key not in raw:
            continue
        value = raw[key]
        if key == "head_dim":
            heads, width = raw.get("num_attention_heads"), raw.get("hidden_size")
            ok = value is None or not all(isinstance(x, int) for x in (value, heads, width)) or value * heads == width
        else:
            ok = accepts(value)
        if not ok:
            raise CheckpointError(f"{config_file}: {key} = {json.dumps(value)} is not implemented by the converter "
                                  f"(supported: {supported}); importing it would change the model's outputs")


def _weight_files(hf_dir: Path, allow_pickle: bool) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
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


def _read_tensors(files: list[Path]):
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".bin":
            yield from torch.load(file, map_location="cpu", weights_only=True).items()
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as exc:  # truncated or corrupt files surface as SafetensorError / OSError
            raise CheckpointError(f"{file.name} is unreadable (truncated or corrupt?): {exc}") from None


def import_hf(hf_dir: str | Path, allow_pickle: bool = False) -> tuple[torch.nn.Module, ModelConfig]:
    """A native model (CPU, fp32 as stored) with the weights of a Hugging Face directory."""
    from pretrain.models import build_model

    hf_dir = Path(hf_dir)
    cfg, _ = native_config(hf_dir)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # rotary tables; every weight is overwritten below
    expected = dict(model.state_dict())
    reverse = _reverse_names(expected, cfg)
    read = set()  # (native name, piece): piece None for a whole tensor, (expert, first row) for a stacked expert's
    with torch.no_grad():
        for name, tensor in _read_tensors(_weight_files(hf_dir, allow_pickle)):
            if name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias") or "rotary" in name \
                    or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias") \
                    or name.endswith("position_ids") or name.startswith(("bert.pooler", "cls.seq_relationship")):
                continue  # tied copies, buffers, heads BertForMaskedLM does not use
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            extra_layer = re.match(r"^model\.layers\.(\d+)\.", name)
            if extra_layer and int(extra_layer.group(1)) >= cfg.n_layers:
                continue  # GLM-4.5's multi-token-prediction layers: not part of the causal LM
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
    not_in_hf = {k for k in expected if k.endswith("e_score_correction_bias") and hf_kind(cfg) != "glm4_moe"}
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
        kind = hf_kind(cfg) if cfg.arch == "gpt" else None
        for name, value in expected.items():
            moe = _moe_tensor(name, value, cfg, kind) if kind else None
            if moe is None:
                hf = _rename(name, table)
                if hf is not None:
                    reverse.setdefault(hf, []).append((name, same))
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


def save_native(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, overwrite: bool = False,
                inputs=()) -> Path:
    """A model-only native checkpoint (step 0) of ``model``: the start of a run that continues pretraining.
    Written beside ``out_dir`` and renamed into place; an earlier import there is replaced only at the end."""
    from pretrain.checkpoint.manager import CheckpointManager, step_dir_name

    out = Path(out_dir)
    check_output(out, inputs, overwrite, "model-only checkpoint (--to native)", is_native_import, CheckpointError)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        CheckpointManager(tmp).save(0, model, None, {"model_only": True}, Config(model=cfg).to_toml())
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / step_dir_name(0)
