"""Multi-head latent attention (DeepSeek-V2, 2024; DeepSeek-V3), ``model.attention = "mla"``.

Shapes: B batch, T tokens, D model dim, H heads, n = ``qk_nope_head_dim``, r = ``qk_rope_head_dim``,
v = ``v_head_dim``, c = ``kv_lora_rank``, c_q = ``q_lora_rank``. Per token x (D,):

    q        = q_b_proj(RMSNorm(q_a_proj x))           (H, n + r)    [q_proj x when q_lora_rank = 0: V2-Lite]
               (the latents' RMSNorms take epsilon 1e-6 whatever model.norm_eps, as DeepSeek's code does)
    c_kv, kr = kv_a_proj_with_mqa x                     (c,), (r,)   the latent and one RoPE key for every head
    k_n, v   = kv_b_proj(RMSNorm(c_kv))                 (H, n), (H, v)
    q = [q_n, RoPE(q_r)],  k = [k_n, RoPE(kr) for every head]       (H, n + r)
    y        = o_proj(softmax(q kᵀ · s) v)              s = (n + r)^-½ · mscale²

mscale = 0.1 · ``mscale_all_dim`` · ln(factor) + 1 under YaRN RoPE scaling that names ``mscale_all_dim`` (DeepSeek-V3's
correction of the softmax temperature); 1 otherwise. RoPE is our rotate-half form over the r dims; Hugging Face's
DeepSeek-V3 rotates interleaved pairs, which the converter turns into rotate-half by permuting the rows of the
RoPE parts of ``q_b_proj`` (``q_proj``) and ``kv_a_proj_with_mqa`` (scores unchanged: q and k permuted alike).
Parameter names are Hugging Face's. The attention is ``model.kernels``' (the Triton FlashAttention takes a value head
dim other than the query/key one, as SDPA does; packed documents in both); prefix-tree scoring (branch ids) and
dropout take the torch reference, as in ``layers.Attention``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.models.layers import Documents, RMSNorm, Rotary
from pretrain.models.ops import Ops, torch_attention
from pretrain.models.rope import yarn_mscale


def softmax_scale(cfg: ModelConfig) -> float:
    """(n + r)^-½, times mscale² under YaRN scaling with ``mscale_all_dim`` (DeepSeek-V3's configs)."""
    scale = cfg.qk_head_dim ** -0.5
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn" and scaling.get("mscale_all_dim"):
        mscale = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale *= mscale * mscale
    return scale


LATENT_EPS = 1e-6  # the latents' RMSNorm epsilon: DeepSeek's (and transformers') fixed value, not model.norm_eps


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, *, causal: bool = True):
        super().__init__()
        self.ops, self.causal, self.dropout = ops, causal, cfg.dropout
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads, self.nope, self.rope, self.v_dim = h, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent = cfg.kv_lora_rank
        qk = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_EPS, ops)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.latent + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent, LATENT_EPS, ops)
        self.kv_b_proj = nn.Linear(self.latent, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)
        self.scale = softmax_scale(cfg)
        self.context = None  # context parallelism (parallel/context_parallel.py) replaces the attention op
        self.tp_group = None  # tensor parallelism: this rank holds n_heads / tp heads (parallel/tensor_parallel.py)

    def _query(self, x):
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, rotary: Rotary | None = None, key_padding_mask=None, documents: Documents | None = None):
        b, t, _ = x.shape
        q = self._query(x).view(b, t, -1, self.nope + self.rope).transpose(1, 2)  # (B, H, T, n + r)
        h = q.shape[1]  # this rank's heads
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope], dim=-1)
        if self.tp_group is not None:  # every rank's heads read the one RoPE key: its gradient is their sum
            k_rope = _SumGradient.apply(k_rope, self.tp_group)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, t, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = k_rope.reshape(b, 1, t, self.rope)
        if rotary is not None:
            positions = documents.positions if documents is not None else None
            if positions is None and self.context is not None:  # this rank's chunks of the sequence
                positions = self.context.positions(t, x.device)
            q_rope, k_rope = rotary(q_rope.contiguous(), k_rope.contiguous(), positions)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, h, t, self.rope)], dim=-1)
        if self.context is not None:
            return self.o_proj(self._across_ranks(q, k, v, documents).transpose(1, 2).reshape(b, t, h * self.v_dim))
        extra = {"dropout_p": self.dropout} if self.training and self.dropout else {}
        if documents is not None and documents.ids is not None:
            extra["document_ids"] = documents.ids
        if "attention" not in self.ops.triton:  # SDPA / FlexAttention: v as one tensor (the kernel reads the view)
            v = v.contiguous()
        if extra.get("dropout_p") or (documents is not None and documents.branches is not None):
            y = torch_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, scale=self.scale,
                                branch_ids=documents.branches if documents is not None else None, **extra)
        else:
            y = self.ops.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, scale=self.scale,
                                   **extra)  # (B, H, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * self.v_dim))

    def _across_ranks(self, q, k, v, documents):
        """Context parallelism (ring or all-to-all), whose attention takes one head dim and the 1/√E scale: v
        padded with zeros to the query/key head dim (the output's extra columns are zero and dropped), q scaled
        so that 1/√E becomes this module's scale."""
        if documents is not None and documents.branches is not None:
            raise ValueError("branch ids (prefix-tree scoring) are not supported under context parallelism")
        e = q.shape[-1]
        q = q * (self.scale * e ** 0.5)
        if self.v_dim < e:
            v = torch.nn.functional.pad(v, (0, e - self.v_dim))
        y = self.context(q, k, v.contiguous(), document_ids=documents.ids if documents is not None else None)
        return y[..., :self.v_dim]


class _SumGradient(torch.autograd.Function):
    """Identity whose backward all-reduces the gradient over ``group`` (Megatron's copy-to-tensor-parallel-region):
    a replicated tensor each tensor-parallel rank uses for its own heads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
