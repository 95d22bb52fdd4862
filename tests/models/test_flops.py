import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.flops import flops_per_token, matmul_params


def test_hand_count_llama():
    # L=2, D=64, H=4, K=2, E=16, F=128 (set), V=100, T=32
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.ffn_hidden=128", "model.vocab_size=100", "model.seq_len=32"]).model
    q, kv, o = 64 * 64, 2 * 64 * 32, 64 * 64  # q_proj, k_proj + v_proj (K*E = 32), o_proj
    mlp = 3 * 64 * 128
    head = 64 * 100
    n = 2 * (q + kv + o + mlp) + head
    assert matmul_params(cfg) == n == 2 * (4096 + 4096 + 4096 + 24576) + 6400 == 80128
    attention = 3 * 2 * (2 * 32 * 64 + 2 * 32 * 64)  # fwd+bwd x layers x (QK^T + AV) per token
    assert flops_per_token(cfg) == 6 * 80128 + attention == 529_920


def test_gpt_125m_flops():
    cfg = load_config("configs/gpt_125m.toml").model
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50304
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("arch, flavor", [("gpt", "llama"), ("gpt", "gpt2"), ("bert", "llama")])
def test_formula_matches_counted_matmuls(arch, flavor):
    """torch's FlopCounterMode over one forward + backward counts exactly the formula's FLOPs."""
    cfg = load_config(None, [f"model.arch={arch}", f"model.flavor={flavor}", "model.n_layers=2", "model.d_model=32",
                             "model.n_heads=4", "model.n_kv_heads=2" if flavor == "llama" else "model.n_kv_heads=4",
                             "model.vocab_size=50", "model.seq_len=24", "model.tie_embeddings=true"]).model
    model = build_model(cfg)
    tokens = torch.randint(8, 50, (3, 24))
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into bmm, which the counter sees (the fused CPU kernel it does not)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).sum().backward()
    assert counter.get_total_flops() == flops_per_token(cfg) * tokens.numel()


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_mla_formula_matches_counted_matmuls_and_parameters(q_lora_rank):
    """MLA (qk head dim 12 ≠ v head dim 6; with and without the query bottleneck): the counter's FLOPs over one
    forward + backward equal the formula's, and the closed-form parameter count the model's."""
    from pretrain.models.flops import num_params

    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=50",
                             "model.seq_len=24", "model.attention=mla", f"model.q_lora_rank={q_lora_rank}",
                             "model.kv_lora_rank=12", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4",
                             "model.v_head_dim=6"]).model
    model = build_model(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(8, 50, (3, 24))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).sum().backward()
    assert counter.get_total_flops() == flops_per_token(cfg) * tokens.numel()


@pytest.mark.parametrize("shared, dense", [(0, 0), (1, 1)])
def test_moe_formula_counts_the_active_experts_only(shared, dense):
    """An MoE GPT: the counter sees the router, the k experts each token went to and the shared experts (the
    per-expert loop, whose matmuls it counts; it has no rule for the grouped GEMM) — equal to the formula."""
    cfg = load_config(None, ["model.n_layers=3", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.vocab_size=50", "model.seq_len=24", "model.n_experts=6", "model.moe_top_k=2",
                             "model.moe_ffn_hidden=40", f"model.n_shared_experts={shared}",
                             f"model.moe_dense_layers={dense}"]).model
    model = build_model(cfg)
    for block in model.layers.values():
        if hasattr(block.mlp, "dispatcher"):
            block.mlp.dispatcher.grouped = False
    tokens = torch.randint(8, 50, (3, 24))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).sum().backward()
    assert counter.get_total_flops() == flops_per_token(cfg) * tokens.numel()
    dense_cfg = load_config(None, ["model.n_layers=3", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                                   "model.vocab_size=50", "model.seq_len=24"]).model
    assert flops_per_token(cfg) != flops_per_token(dense_cfg)
