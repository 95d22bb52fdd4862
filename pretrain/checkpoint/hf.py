"""Hugging Face conversion: GPT llama flavour <-> ``LlamaForCausalLM`` (GQA included), gpt2 flavour <->
``GPT2LMHeadModel``, BERT <-> ``BertForMaskedLM``.

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

SUPPORTED = {"LlamaForCausalLM": ("gpt", "llama"), "GPT2LMHeadModel": ("gpt", "gpt2"), "BertForMaskedLM": ("bert", "")}
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
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(cfg.seq_len, cfg.max_position_embeddings), rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], bos_token_id=2, eos_token_id=3, pad_token_id=0)


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
        for name, t in state.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            yield _rename(name, LLAMA_NAMES), t
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
        cfg = ModelConfig(arch="gpt", flavor="llama", n_layers=raw["num_hidden_layers"], d_model=raw["hidden_size"],
                          n_heads=raw["num_attention_heads"],
                          n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                          ffn_hidden=raw["intermediate_size"], vocab_size=raw["vocab_size"],
                          seq_len=min(4096, raw.get("max_position_embeddings", 4096)),
                          rope_theta=float(raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta",
                                                                                                     10000.0))),
                          norm_eps=raw.get("rms_norm_eps", 1e-6), tie_embeddings=raw.get("tie_word_embeddings", False))
    return cfg


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
    seen = set()
    with torch.no_grad():
        for name, tensor in _read_tensors(_weight_files(hf_dir, allow_pickle)):
            if name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias") or "rotary" in name \
                    or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias") \
                    or name.endswith("position_ids") or name.startswith(("bert.pooler", "cls.seq_relationship")):
                continue  # tied copies, buffers, heads BertForMaskedLM does not use
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if name not in reverse:
                raise CheckpointError(f"unexpected weight {name!r} for a {cfg.arch}/{cfg.flavor} model")
            for target, convert in reverse[name]:
                value = convert(tensor)
                if expected[target].shape != value.shape:
                    raise CheckpointError(f"weight {name} has shape {tuple(tensor.shape)}, the config implies "
                                          f"{tuple(expected[target].shape)}")
                expected[target].copy_(value)
                seen.add(target)
    missing = sorted(set(expected) - seen - ({"lm_head.weight"} if cfg.tie_embeddings else set())
                     - {k for k in expected if k.startswith(("pooler", "nsp_head"))})
    if missing:
        raise CheckpointError(f"{hf_dir} lacks weight(s) for {missing[0]} ({len(missing)} missing)")
    return model.eval(), cfg


def _reverse_names(expected: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, list]:
    """HF name -> [(native name, converter)]."""
    reverse: dict[str, list] = {}
    same = lambda t: t  # noqa: E731
    if cfg.arch == "bert" or cfg.flavor == "llama":
        table = BERT_NAMES if cfg.arch == "bert" else LLAMA_NAMES
        for name in expected:
            hf = _rename(name, table)
            if hf is not None:
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
