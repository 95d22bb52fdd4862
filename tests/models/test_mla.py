"""Multi-head latent attention (pretrain/models/mla.py) against a plain einsum reference written from the DeepSeek-V2/V3
definitions: outputs and every gradient in float64, with and without the query bottleneck, under YaRN with its
softmax-scale correction, with packed documents; an MLA GPT that trains; the config's refusals."""

import math

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.models import build_model
from pretrain.models.rope import inverse_frequencies

from ..conftest import tiny_config

MLA = ["model.attention=mla", "model.kv_lora_rank=12", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4",
       "model.v_head_dim=6"]
YARN = 'model.rope_scaling={rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 16, mscale = 1.0, ' \
       'mscale_all_dim = 1.0}'


def mla_cfg(*extra):
    return load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=50",
                              "model.seq_len=24", *MLA, *extra]).model


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference(attn, cfg, x, positions, document_ids=None):
    """The definition, term by term, from the module's weights."""
    b, t, _ = x.shape
    h, n, r, v, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, 1e-6) @ attn.q_b_proj.weight.T
    else:
        q = x @ attn.q_proj.weight.T
    q = q.view(b, t, h, n + r)
    latent = x @ attn.kv_a_proj_with_mqa.weight.T
    kv = rms(latent[..., :c], attn.kv_a_layernorm.weight, 1e-6) @ attn.kv_b_proj.weight.T
    kv = kv.view(b, t, h, n + v)
    inv, factor = inverse_frequencies(r, cfg.rope_theta, cfg.rope_scaling)
    angles = positions[..., None].double() * inv.double()  # (B, T, r/2)
    cos = (torch.cat([angles, angles], -1).cos() * factor)[:, :, None]
    sin = (torch.cat([angles, angles], -1).sin() * factor)[:, :, None]
    q_full = torch.cat([q[..., :n], rotate(q[..., n:], cos, sin)], -1)
    k_rope = rotate(latent[..., c:][:, :, None], cos, sin).expand(b, t, h, r)
    k_full = torch.cat([kv[..., :n], k_rope], -1)
    scale = (n + r) ** -0.5
    if cfg.rope_scaling.get("mscale_all_dim"):
        m = 0.1 * cfg.rope_scaling["mscale_all_dim"] * math.log(cfg.rope_scaling["factor"]) + 1
        scale *= m * m
    scores = torch.einsum("bthe,bshe->bhts", q_full, k_full) * scale
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    y = torch.einsum("bhts,bshe->bthe", p, kv[..., n:]).reshape(b, t, h * v)
    return y @ attn.o_proj.weight.T


@pytest.mark.parametrize("extra", [["model.q_lora_rank=16"], [], ["model.q_lora_rank=16", YARN]],
                         ids=["q_lora", "v2_lite", "yarn_mscale"])
def test_latent_attention_equals_its_definition_with_gradients(extra):
    cfg = mla_cfg(*extra)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    attn = model.layers["0"].self_attn
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the norms' weights too
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    got = attn(x, model.rotary)
    want = reference(attn, cfg, x, torch.arange(19).expand(2, 19))
    assert (got - want).abs().max() <= 1e-6  # the rotary tables are fp32 (the reference's angles float64)
    grads = torch.autograd.grad(got.square().sum(), [x, *attn.parameters()])
    wants = torch.autograd.grad(want.square().sum(), [x, *attn.parameters()])
    for name, g, w in zip(["x", *(n for n, _ in attn.named_parameters())], grads, wants):
        assert (g - w).abs().max() <= 1e-6, name


def test_packed_documents_attend_within_themselves_with_restarted_positions():
    cfg = mla_cfg("model.q_lora_rank=16")
    torch.manual_seed(1)
    model = build_model(cfg).double()
    attn = model.layers["1"].self_attn
    ids = torch.tensor([[0] * 7 + [1] * 5 + [2] * 8, [0] * 20])
    positions = torch.cat([torch.arange(7), torch.arange(5), torch.arange(8)]).view(1, 20)
    positions = torch.cat([positions, torch.arange(20)[None]])
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    from pretrain.models.layers import Documents

    got = attn(x, model.rotary, documents=Documents(ids, positions))
    assert (got - reference(attn, cfg, x, positions, ids)).abs().max() <= 1e-6
    alone = attn(x[:1, 7:12], model.rotary)  # the second document by itself
    assert (got[0, 7:12] - alone[0]).abs().max() <= 1e-10


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_the_triton_attention_runs_mla_as_torch_does(documents):
    """model.kernels = "attention" (the Triton FlashAttention, interpreted here; fp32) runs MLA's heads — q/k 12
    wide, v 6: padded to 16 and 16 registers, the value's own bounds — and gives the torch backend's loss and
    every gradient, with packed documents too. Under the torch backend the loss is the same module's."""
    pytest.importorskip("pretrain.kernels.attention")
    losses, grads = {}, {}
    for kernels in ("torch", "attention"):
        cfg = mla_cfg("model.q_lora_rank=16", f"model.kernels={kernels}")
        torch.manual_seed(3)
        model = build_model(cfg)
        tokens, targets = torch.randint(0, 50, (2, 21)), torch.randint(0, 50, (2, 21))
        ids = torch.tensor([[0] * 6 + [1] * 9 + [2] * 6, [0] * 21]) if documents else None
        loss = model(tokens, targets, document_ids=ids)
        loss.backward()
        losses[kernels] = loss.item()
        grads[kernels] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert losses["torch"] == pytest.approx(losses["attention"], abs=1e-5)
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["attention"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_an_mla_moe_gpt_trains(tmp_path):
    from pretrain.distributed import DistInfo
    from pretrain.metrics import read_metrics
    from pretrain.train import build_trainer

    cfg = tiny_config(tmp_path, *MLA, "model.q_lora_rank=16", "model.n_experts=4", "model.moe_top_k=2",
                      "model.moe_router=sigmoid", "model.moe_balance=bias", "model.moe_n_group=2",
                      "model.moe_topk_group=1", "model.moe_routed_scaling=2.5", "train.steps=8", "logging.interval=1")
    build_trainer(cfg, DistInfo()).fit()
    losses = [r["loss"] for r in read_metrics(cfg.logging.run_dir) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.parametrize("extra, message", [
    (["model.kv_lora_rank=0"], r'model.attention = "mla" needs model.kv_lora_rank > 0'),
    (["model.qk_rope_head_dim=3"], r"model.qk_rope_head_dim \(3\) must be even"),
    (["model.n_kv_heads=2"], r"model.n_kv_heads must be 0, got 2"),
    (["model.qk_norm=true"], r'model.qk_norm does not combine with model.attention = "mla"'),
    (["model.flavor=gpt2"], r'model.attention = "mla" is for the llama-flavour GPT, not gpt/gpt2'),
    (["parallel.tp=3"], r"model.n_heads \(4\) must be divisible by parallel.tp \(3\): MLA splits heads"),
    (["model.attention=mqa"], r"model.attention = 'mqa' is not one of mha, mla"),
    (["model.qk_nope_head_dim=200", "model.qk_rope_head_dim=64", "model.kernels=triton"],
     r"the Triton attention takes head dims up to 256 .* query/key head dim is 264"),
    (["model.v_head_dim=320", "model.kernels=attention"], r"this model's value head dim is 320"),
])
def test_bad_mla_configs(extra, message):
    with pytest.raises(ConfigError, match=message):
        mla_cfg(*extra)


def test_mla_keys_without_mla_are_said_inert():
    cfg = load_config(None, ["model.kv_lora_rank=8"])
    assert any("model.kv_lora_rank" in line for line in cfg.inert())
