"""Hugging Face export / import: logits parity both ways, bit-identical round trips, greedy generation, the
tokenizer, sharding, and every bad input as one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.hf import export_hf, import_hf, to_hf_tensors
from pretrain.checkpoint.manager import CheckpointError
from pretrain.config import load_config
from pretrain.models import build_model

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]

ARCHS = {
    "llama_gqa": ["model.flavor=llama", "model.n_kv_heads=2", "model.tie_embeddings=false"],
    "llama_tied": ["model.flavor=llama", "model.tie_embeddings=true"],
    "gpt2": ["model.flavor=gpt2", "model.tie_embeddings=true"],
    "gpt2_untied": ["model.flavor=gpt2", "model.tie_embeddings=false"],
    "bert": ["model.arch=bert"],
    "qwen3": ["model.n_kv_heads=2", "model.qk_norm=true"],
    "mixtral": ["model.n_kv_heads=2", "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16"],
    "qwen3_moe": ["model.n_kv_heads=2", "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16",
                  "model.qk_norm=true", "model.moe_dense_layers=1", "model.n_layers=3"],
    "glm4_moe": ["model.n_kv_heads=2", "model.n_experts=8", "model.moe_top_k=3", "model.moe_ffn_hidden=16",
                 "model.moe_router=sigmoid", "model.n_shared_experts=2", "model.moe_dense_layers=1",
                 "model.moe_balance=bias", "model.n_layers=3"],
    "glm4_moe_qk_norm": ["model.n_experts=4", "model.moe_top_k=2", "model.moe_router=sigmoid", "model.qk_norm=true",
                         "model.moe_balance=both"],
    # today's families, each quirk kept at a small size
    "llama32": ["model.n_kv_heads=2", "model.tie_embeddings=true", "model.rope_theta=500000.0",
                'model.rope_scaling={rope_type = "llama3", factor = 32.0, low_freq_factor = 1.0, high_freq_factor = 4.0, '
                "original_max_position_embeddings = 64}"],
    "qwen2": ["model.n_kv_heads=2", "model.qkv_bias=true", "model.rope_theta=1000000.0"],
    "qwen2_yarn": ["model.n_kv_heads=2", "model.qkv_bias=true",
                   'model.rope_scaling={rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 16}'],
    "qwen3_head_dim": ["model.n_kv_heads=2", "model.qk_norm=true", "model.head_dim=16"],
    "mistral": ["model.n_kv_heads=2", "model.head_dim=16", "model.hf_architecture=MistralForCausalLM",
                'model.rope_scaling={rope_type = "linear", factor = 2.0}'],
    "qwen3_moe_head_dim": ["model.n_kv_heads=2", "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16",
                           "model.qk_norm=true", "model.head_dim=16"],
    "glm4_moe_bias": ["model.n_kv_heads=2", "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16",
                      "model.moe_router=sigmoid", "model.moe_balance=bias", "model.qkv_bias=true"],
    # DeepSeek-V3's routing: 4 groups of 2, the best 2 groups, top-3 within them, weights × 2.5
    "glm4_moe_groups": ["model.n_kv_heads=2", "model.n_experts=8", "model.moe_top_k=3", "model.moe_ffn_hidden=16",
                        "model.moe_router=sigmoid", "model.moe_balance=bias", "model.moe_n_group=4",
                        "model.moe_topk_group=2", "model.moe_routed_scaling=2.5", "model.n_shared_experts=1"],
    # DeepSeek-V3: MLA (query bottleneck, qk 12 ≠ v 6), YaRN with mscale, a dense first layer, group routing
    "deepseek_v3": ["model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=12",
                    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=6", "model.n_layers=3",
                    "model.n_experts=8", "model.moe_top_k=3", "model.moe_ffn_hidden=16", "model.moe_router=sigmoid",
                    "model.moe_balance=bias", "model.moe_n_group=4", "model.moe_topk_group=2",
                    "model.moe_routed_scaling=2.5", "model.n_shared_experts=1", "model.moe_dense_layers=1",
                    'model.rope_scaling={rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 16, '
                    "mscale = 1.0, mscale_all_dim = 1.0, beta_fast = 32, beta_slow = 1}"],
    "deepseek_v3_mtp": ["model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=12",
                        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=6",
                        "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=16", "model.moe_router=sigmoid",
                        "model.moe_balance=bias", "model.n_shared_experts=1", "model.mtp_depth=2"],
    "deepseek_v2_lite_dense": ["model.attention=mla", "model.kv_lora_rank=12", "model.qk_nope_head_dim=8",
                               "model.qk_rope_head_dim=4", "model.v_head_dim=8"],
}
HF_CLASS_OF = {"qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_qk_norm": "Glm4MoeForCausalLM", "llama32": "LlamaForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen2_yarn": "Qwen2ForCausalLM", "qwen3_head_dim": "Qwen3ForCausalLM",
               "mistral": "MistralForCausalLM", "qwen3_moe_head_dim": "Qwen3MoeForCausalLM",
               "glm4_moe_bias": "Glm4MoeForCausalLM", "glm4_moe_groups": "Glm4MoeForCausalLM",
               "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2_lite_dense": "DeepseekV3ForCausalLM",
               "deepseek_v3_mtp": "DeepseekV3ForCausalLM"}
TODAY = ["llama32", "qwen2", "qwen2_yarn", "qwen3_head_dim", "mistral", "qwen3_moe_head_dim", "glm4_moe_bias",
         "glm4_moe_groups", "deepseek_v3", "deepseek_v2_lite_dense"]
HF_CLASSES = {"gpt": None, "bert": "BertForMaskedLM"}


def model_cfg(name):
    return load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=96",
                              "model.seq_len=24", "model.norm_eps=1e-5", *ARCHS[name]]).model


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # randomise everything, norms and biases too, so no mapping error hides
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias") and cfg.moe_router == "sigmoid":
                b.copy_(0.05 * torch.randn_like(b))  # the selection bias changes which experts run
    return model


def hf_logits(hf, tokens, mask=None):
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask).logits


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_logits_parity_and_bit_identical_round_trip(tmp_path, name):
    cfg = model_cfg(name)
    ours = random_model(cfg)
    out = export_hf(ours, cfg, tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out) if cfg.arch == "bert" else \
        transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    mask = None
    if cfg.arch == "bert":
        mask = torch.ones(2, 19, dtype=torch.long)
        mask[1, 13:] = 0
        with torch.no_grad():
            theirs, mine = hf_logits(hf, tokens, mask), ours(tokens, mask.bool())
        keep = mask.bool()
        assert (theirs[keep] - mine[keep]).abs().max() <= 1e-5
    else:
        with torch.no_grad():
            assert (hf_logits(hf, tokens) - ours(tokens)).abs().max() <= 1e-5
    if name in HF_CLASS_OF:
        assert type(hf).__name__ == HF_CLASS_OF[name]
    back, back_cfg = import_hf(out)
    expected = {k: v for k, v in ours.state_dict().items() if not k.startswith(("pooler", "nsp_head"))}
    got = back.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "bert", "qwen3", "mixtral", "qwen3_moe", "glm4_moe"])
def test_import_from_transformers_gives_its_logits(tmp_path, name):
    from pretrain.checkpoint.hf import hf_config

    cfg = model_cfg(name)
    torch.manual_seed(1)
    config = hf_config(cfg)
    hf = (transformers.BertForMaskedLM(config) if cfg.arch == "bert" else
          transformers.AutoModelForCausalLM.from_config(config)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = import_hf(tmp_path / "hf")
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        assert (hf_logits(hf, tokens) - ours(tokens)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", TODAY)
def test_todays_families_from_transformers_and_back(tmp_path, name):
    """A model transformers builds (every weight and bias randomised): our import gives its logits and its greedy
    continuation, and our export writes its safetensors back bit for bit."""
    from safetensors.torch import load_file

    from pretrain.checkpoint.hf import hf_config

    cfg = model_cfg(name)
    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(cfg)).eval()
    assert type(hf).__name__ == HF_CLASS_OF[name]
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours, back_cfg = import_hf(tmp_path / "hf")
    assert back_cfg.head_size == cfg.head_size and back_cfg.rope_scaling == cfg.rope_scaling
    assert back_cfg.qkv_bias == cfg.qkv_bias
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert (hf_logits(hf, tokens) - ours(tokens)).abs().max() <= 1e-5
        # the rotary tables themselves (small random weights make logits nearly blind to RoPE)
        positions = torch.arange(96)[None]
        cos, sin = hf.model.rotary_emb(torch.zeros(1, 96, cfg.head_size), positions)
        table = ours.rotary
        table.max_len = 96
        table.reset_parameters()
        assert (cos[0] - table.cos).abs().max() <= 1e-6 and (sin[0] - table.sin).abs().max() <= 1e-6
    prompt = torch.randint(7, cfg.vocab_size, (1, 5))
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.generate(prompt, max_new_tokens=8).tolist() == theirs.tolist()
    out = export_hf(ours, back_cfg, tmp_path / "again")
    assert json.loads((out / "config.json").read_text())["architectures"] == [HF_CLASS_OF[name]]
    original, again = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    original = {k: v for k, v in original.items() if v.numel()}  # GLM-4-MoE stores absent shared experts 0-wide
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert torch.equal(again[key], value), key


def test_greedy_generation_is_identical_through_transformers(tmp_path):
    cfg = model_cfg("llama_gqa")
    ours = random_model(cfg, seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ours, cfg, tmp_path / "hf")).eval()
    prompt = torch.randint(7, cfg.vocab_size, (1, 5))
    mine = ours.generate(prompt, max_new_tokens=12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert mine.tolist() == theirs.tolist()


def test_tokenizer_ships_and_autotokenizer_encodes_like_ours(tmp_path, prepared):
    from pretrain.data.tokenizer import Tokenizer

    cfg = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.vocab_size=512",
                             "model.seq_len=16"]).model
    out = export_hf(random_model(cfg), cfg, tmp_path / "hf", tokenizer_path=prepared / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(prepared / "tokenizer.model")
    text = "def add(a, b):\n    return a + b\n"
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    with pytest.raises(CheckpointError, match="more than the model's vocab"):
        small = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64",
                                   "model.seq_len=16"]).model
        export_hf(random_model(small), small, tmp_path / "hf2", tokenizer_path=prepared / "tokenizer.model")


def test_sharded_export_and_import(tmp_path):
    cfg = model_cfg("llama_gqa")
    ours = random_model(cfg)
    out = export_hf(ours, cfg, tmp_path / "hf", shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    back, _ = import_hf(out)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert (hf_logits(hf, tokens) - ours(tokens)).abs().max() <= 1e-5


def test_bad_inputs_are_one_clear_line(tmp_path):
    cfg = model_cfg("llama_gqa")
    good = export_hf(random_model(cfg), cfg, tmp_path / "good")
    with pytest.raises(CheckpointError, match="holds an earlier Hugging Face export"):
        export_hf(random_model(cfg), cfg, good)
    assert (good / "model.safetensors").is_file()  # untouched
    bad_arch = tmp_path / "mamba"
    bad_arch.mkdir()
    (bad_arch / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="unsupported Hugging Face architecture 'MambaForCausalLM': supported"):
        import_hf(bad_arch)
    with pytest.raises(CheckpointError, match="has no config.json"):
        import_hf(tmp_path)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has no weights"):
        import_hf(no_weights)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((good / "config.json").read_text())
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable"):
        import_hf(truncated)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(good)
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickled weights .*--allow-pickle"):
        import_hf(pickled)
    model, _ = import_hf(pickled, allow_pickle=True)
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight)


ROUND_TRIP = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=512", "model.seq_len=16",
              "train.micro_batch_size=4", "schedule.warmup_steps=1", "logging.tensorboard=false", "eval.interval=0",
              "data.source=shards", "model.tie_embeddings=false"]


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, prepared):
    """A 2-step run converted to HF and back with tools/convert_checkpoint.py: (tmp, run dir, hf dir, step dir,
    the second --to hf's result)."""
    tmp = tmp_path_factory.mktemp("round_trip")
    run, common = tmp / "run", [*ROUND_TRIP, f"data.path={prepared}"]
    subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *common, "train.steps=2",
                    "checkpoint.interval=2", f"logging.run_dir={run}"], cwd=ROOT, check=True, capture_output=True)
    hf_dir, native = tmp / "hf", tmp / "native"
    to_hf = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--to", "hf", "--input",
                            str(run / "checkpoints"), "--output", str(hf_dir)], cwd=ROOT, capture_output=True, text=True)
    assert to_hf.returncode == 0, to_hf.stderr
    again = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--to", "hf", "--input",
                            str(run / "checkpoints"), "--output", str(hf_dir)], cwd=ROOT, capture_output=True, text=True)
    to_native = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--to", "native", "--input",
                                str(hf_dir), "--output", str(native)], cwd=ROOT, capture_output=True, text=True)
    assert to_native.returncode == 0, to_native.stderr
    return tmp, run, hf_dir, native / "step-00000000", again


def test_cli_round_trip_is_bit_identical_and_never_overwrites(round_trip):
    _, run, hf_dir, step, again = round_trip
    assert (hf_dir / "tokenizer.model").is_file() and (hf_dir / "config.json").is_file()
    assert again.returncode == 2 and again.stderr.strip().startswith("error: output") and \
        len(again.stderr.strip().splitlines()) == 1
    from pretrain.checkpoint import load_model

    original, _ = load_model(run / "checkpoints")
    imported, _ = load_model(step)
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in original.state_dict().items())


@pytest.mark.hf_independent
def test_the_round_trip_continues_pretraining(round_trip, prepared):
    tmp, _, _, step, _ = round_trip
    cont = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *ROUND_TRIP, f"data.path={prepared}",
                           "train.steps=2", f"checkpoint.resume={step}", f"logging.run_dir={tmp / 'continued'}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert cont.returncode == 0, cont.stderr
    assert f"initialised the model from {step}" in cont.stdout + cont.stderr


_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def imported_qwen3(tmp_path_factory):
    """Qwen3-shaped weights (head_dim != d_model / n_heads, QK-norm) saved by transformers and imported with
    tools/convert_checkpoint.py: (tmp, the import's result)."""
    from pretrain.checkpoint.hf import hf_config

    tmp = tmp_path_factory.mktemp("qwen3")
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.head_dim=16", "model.qk_norm=true", "model.vocab_size=512",
                             "model.seq_len=16"]).model
    torch.manual_seed(4)
    transformers.AutoModelForCausalLM.from_config(hf_config(cfg)).save_pretrained(tmp / "hf")
    imported = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--to", "native", "--input",
                               str(tmp / "hf"), "--output", str(tmp / "qwen3")], cwd=ROOT, env=_ONE_THREAD,
                              capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    return tmp, imported


IMPORTED_RUN = ["train.steps=3", "train.micro_batch_size=4", "schedule.warmup_steps=1", "logging.interval=1",
                "logging.tensorboard=false", "eval.interval=0", "checkpoint.interval=0"]


def test_import_prints_the_command_and_refuses_another_models_config(imported_qwen3, prepared):
    """The import prints the command with the train.toml it wrote (which still needs data.path); a config of
    another model resuming the imported step is refused with the command to use instead."""
    tmp, imported = imported_qwen3
    command = [line.strip() for line in imported.stdout.splitlines() if "pretrain.train" in line][0]
    assert command == f"python -m pretrain.train --config {tmp / 'qwen3' / 'train.toml'} --set data.path=DATA"
    unset = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(tmp / "qwen3" / "train.toml")],
                           cwd=ROOT, env=_ONE_THREAD, capture_output=True, text=True)
    assert unset.returncode != 0 and 'data.source = "shards" needs data.path' in unset.stderr
    wrong = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", f"data.path={prepared}", *IMPORTED_RUN,
                            "model.vocab_size=512", f"checkpoint.resume={tmp / 'qwen3' / 'step-00000000'}",
                            "data.source=shards", f"logging.run_dir={tmp / 'wrong'}"], cwd=ROOT, env=_ONE_THREAD,
                           capture_output=True, text=True)
    assert wrong.returncode != 0
    assert "holds an imported model with model.n_layers = 2, this config has" not in wrong.stderr  # same depth
    assert f"continue with the config the import wrote, python -m pretrain.train --config {tmp / 'qwen3'}" \
        in wrong.stderr


@pytest.mark.hf_independent
def test_the_imported_config_trains_alike_on_one_process_and_under_tensor_parallel(imported_qwen3, prepared):
    tmp, _ = imported_qwen3
    config = ["--config", str(tmp / "qwen3" / "train.toml")]

    def train(name, *launcher_and_layout):
        launcher = [a for a in launcher_and_layout if not a.startswith("parallel.")]
        layout = [a for a in launcher_and_layout if a.startswith("parallel.")]
        run = subprocess.run([sys.executable, *launcher, "-m", "pretrain.train", *config, "--set",
                              f"data.path={prepared}", *IMPORTED_RUN, *layout, f"logging.run_dir={tmp / name}"],
                             cwd=ROOT, env=_ONE_THREAD, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "initialised the model from" in run.stdout + run.stderr
        return [json.loads(line)["loss"] for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]

    one = train("one")
    tp2 = train("tp2", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "parallel.tp=2")
    assert len(one) == len(tp2) == 3 and max(abs(a - b) for a, b in zip(one, tp2)) <= 1e-5, (one, tp2)


def test_mtp_layers_export_in_deepseeks_layout_and_a_checkpoint_without_them_imports_with_mtp_off(tmp_path, capsys):
    """MTP depth j is written as model.layers.{L + j} (enorm, hnorm, eh_proj, shared_head.norm, the block, and the
    copies of the embedding and the head DeepSeek-V3's checkpoints keep), read back bit for bit; transformers drops
    them when it saves, and that folder imports with model.mtp_depth = 0 and one line saying so."""
    from safetensors import safe_open

    cfg = model_cfg("deepseek_v3_mtp")
    ours = random_model(cfg)
    out = export_hf(ours, cfg, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("model.layers.3.shared_head.head.weight"), ours.lm_head.weight)
    for j in (2, 3):
        assert {f"model.layers.{j}.eh_proj.weight", f"model.layers.{j}.enorm.weight", f"model.layers.{j}.hnorm.weight",
                f"model.layers.{j}.shared_head.norm.weight", f"model.layers.{j}.embed_tokens.weight",
                f"model.layers.{j}.self_attn.kv_b_proj.weight", f"model.layers.{j}.mlp.experts.3.down_proj.weight",
                f"model.layers.{j}.mlp.gate.e_score_correction_bias"} <= names
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf.save_pretrained(tmp_path / "resaved")
    notes = []
    back, back_cfg = import_hf(tmp_path / "resaved", say=notes.append)
    assert back_cfg.mtp_depth == 0 and back.mtp is None
    assert len(notes) == 1 and "names 2 multi-token-prediction layer(s) but the weights hold none" in notes[0]
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert (back(tokens) - ours(tokens)).abs().max() <= 1e-5


def _quantize_fp8(folder: Path, block: tuple[int, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rewrite an exported DeepSeek-V3 folder as DeepSeek's Hub checkpoints are stored: every linear weight of the
    layers (projections, experts; not norms, router gates, embeddings or head) fp8 e4m3 with a ``weight_scale_inv``
    of one fp32 scale a block (amax / 448), the config naming the blocks. Returns {name: (fp8, scale)}."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    quantized = {}
    for name, w in list(tensors.items()):
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")) or w.dim() != 2:
            continue
        rows, cols = w.shape
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
        padded[:rows, :cols] = w
        amax = padded.view(grid[0], block[0], grid[1], block[1]).abs().amax(dim=(1, 3)).clamp(min=1e-12)
        scale = amax / 448.0
        full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        q = (w / full).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        quantized[name] = (q, scale)
    save_file(tensors, str(folder / "model.safetensors"))
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(raw))
    return quantized


def test_deepseek_v3_fp8_hub_weights_import_dequantized(tmp_path):
    """DeepSeek-V3's Hub format: block-wise fp8 e4m3 weights with weight_scale_inv (here 8 × 12 blocks, ragged at
    the edges of 56-row, 16-column weights). Each imported weight is the fp8 value times its block's scale, exactly
    (fp32); the other weights are the ones stored; the model's logits are those of a folder holding the
    hand-dequantized weights unquantized."""
    from safetensors.torch import load_file, save_file

    cfg = model_cfg("deepseek_v3")
    ours = random_model(cfg)
    out = export_hf(ours, cfg, tmp_path / "hf")
    quantized = _quantize_fp8(out, (8, 12))
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in quantized and len(quantized) > 40
    back, _ = import_hf(out)
    hf_of = dict(to_hf_tensors(back.state_dict(), cfg))
    exported = export_hf(ours, cfg, tmp_path / "plain")
    plain = load_file(str(exported / "model.safetensors"))
    for name, (q, scale) in quantized.items():
        rows, cols = q.shape
        want = q.float() * scale.repeat_interleave(8, 0)[:rows].repeat_interleave(12, 1)[:, :cols]
        assert torch.equal(hf_of[name], want), name
        assert not torch.equal(want, plain[name])  # (fp8 changed it: the scale was applied, not the raw value)
        plain[name] = want
    for name, value in plain.items():
        assert torch.equal(hf_of[name], value), name
    save_file(plain, str(exported / "model.safetensors"))  # the hand-dequantized weights, unquantized
    by_hand, _ = import_hf(exported)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(back(tokens), by_hand(tokens))

    # bad inputs, one line each: a scale missing, another quantization, fp8 weights without a quantization_config
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"fp8 weight model.layers.0.self_attn.o_proj.weight has no "
                                              r"model.layers.0.self_attn.o_proj.weight_scale_inv"):
        import_hf(out)
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r'quantization_config.quant_method = "gptq" is not read'):
        import_hf(out)
    del raw["quantization_config"]
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"is an fp8 weight or its scale, but .* has no quantization_config"):
        import_hf(out)
