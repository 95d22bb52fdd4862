"""Parameter counts in closed form and training FLOPs per token (for MFU).

FLOPs per token, forward + backward (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B):

    6 · N_matmul  +  12 · L · H · E · T       (MLA: 6 · L · H · (E_qk + E_v) · T)

N_matmul counts the weights that take part in a matrix multiply for every token: all projections in the
blocks, the output head (tied or not — the head is a matmul even when it shares the embedding's storage) and,
for BERT, the MLM transform. Embedding lookups, norms and biases are not matmuls and are left out. The second
term is the attention score and value products (2·T·H·E each, forward; ×3 for forward + backward). Like PaLM
and Megatron we count the full T×T product even for causal attention, so MFU figures compare with theirs.
"""

from __future__ import annotations

from pretrain.config import ModelConfig


def attention_matmul_params(cfg: ModelConfig) -> int:
    """One attention block's projection weights: q, k, v, o — or MLA's (models/mla.py): the query (through its
    q_lora_rank bottleneck or not), the kv latent with the shared RoPE key, the latent's up-projection, o."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.mla:
        qk, c, cq = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
        query = cq * d + cq * h * qk if cq else d * h * qk
        return query + d * (c + cfg.qk_rope_head_dim) + c * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
            + h * cfg.v_head_dim * d
    k, e = cfg.kv_heads, cfg.head_size
    return d * h * e + 2 * d * k * e + h * e * d


def layer_matmul_params(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.ffn_dim
    attention = attention_matmul_params(cfg)
    gated = cfg.arch == "gpt" and cfg.flavor == "llama"
    mlp = (3 if gated else 2) * d * f
    return attention + mlp


def moe_layer_params(cfg: ModelConfig, active: bool) -> int:
    """A MoE feed-forward's matmul weights: router, experts (the k a token uses when ``active``), shared."""
    d, i = cfg.d_model, cfg.expert_dim
    experts = cfg.moe_top_k if active else cfg.n_experts
    return d * cfg.n_experts + 3 * d * i * (experts + cfg.n_shared_experts)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights a token multiplies by: with MoE only its k experts count (active parameters), so MFU is honest.
    Multi-token prediction (training) adds per depth its projection, its block and the output head once more."""
    n = cfg.n_layers * layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size  # blocks + output head
    if cfg.n_experts:
        moe_layers = cfg.n_layers - cfg.moe_dense_layers
        n += moe_layers * (moe_layer_params(cfg, active=True) - 3 * cfg.d_model * cfg.ffn_dim)
    if cfg.mtp_depth:  # its blocks are MoE ones when the model has experts (indices past moe_dense_layers)
        block = layer_matmul_params(cfg) + (moe_layer_params(cfg, active=True) - 3 * cfg.d_model * cfg.ffn_dim
                                            if cfg.n_experts else 0)
        n += cfg.mtp_depth * (2 * cfg.d_model * cfg.d_model + block + cfg.d_model * cfg.vocab_size)
    if cfg.arch == "bert":
        n += cfg.d_model * cfg.d_model  # MLM transform
    return n


def num_params(cfg: ModelConfig) -> int:
    """Closed-form count of every parameter the model holds (tied weights counted once)."""
    d, v, f = cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    h_e, k_e = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    per_layer = layer_matmul_params(cfg)
    if cfg.arch == "gpt" and cfg.flavor == "llama":
        per_layer += 2 * d + (2 * cfg.head_size if cfg.qk_norm else 0)  # two RMSNorm weights (+ q/k norms)
        per_layer += cfg.q_lora_rank + cfg.kv_lora_rank if cfg.mla else 0  # MLA's latent norms
        per_layer += h_e + 2 * k_e if cfg.qkv_bias else 0  # Qwen2's q/k/v biases
        total = v * d + cfg.n_layers * per_layer + d  # embedding, blocks, final norm
        if cfg.n_experts:  # MoE layers hold every expert instead of the dense MLP
            moe_layers = cfg.n_layers - cfg.moe_dense_layers
            total += moe_layers * (moe_layer_params(cfg, active=False) - 3 * d * f)
        if cfg.mtp_depth:  # each depth: two input norms, the projection, a block, its final norm
            moe = moe_layer_params(cfg, active=False) - 3 * d * f if cfg.n_experts else 0
            total += cfg.mtp_depth * (3 * d + 2 * d * d + per_layer + moe)
        return total + (0 if cfg.tie_embeddings else d * v)
    # gpt2 and bert: biases on every projection, LayerNorm weight + bias
    per_layer += (h_e + 2 * k_e + d) + (f + d) + 2 * 2 * d
    if cfg.arch == "gpt":  # gpt2
        total = v * d + cfg.positions * d + cfg.n_layers * per_layer + 2 * d
        return total + (0 if cfg.tie_embeddings else d * v)
    embeddings = v * d + cfg.positions * d + cfg.type_vocab_size * d + 2 * d
    mlm_head = d * d + d + 2 * d + v  # transform, its LayerNorm, output bias (decoder tied)
    nsp = (d * d + d + 2 * d + 2) if cfg.nsp_head else 0
    return embeddings + cfg.n_layers * per_layer + mlm_head + nsp


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training (forward + backward) FLOPs per token at sequence length ``seq_len`` (default: model.seq_len)."""
    t = seq_len or cfg.seq_len
    # QKᵀ over the query/key head dim, AV over the value head dim (equal but under MLA): 2·T·H·dim each, ×3
    layers = cfg.n_layers + cfg.mtp_depth  # the MTP blocks attend too
    attention = 6 * layers * cfg.n_heads * (cfg.qk_head_dim + cfg.value_head_dim) * t
    return 6 * matmul_params(cfg) + attention
