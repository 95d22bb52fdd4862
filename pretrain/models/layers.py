"""Building blocks shared by the GPT and BERT families.

Shapes: B batch, T tokens, D model dim, H query heads, K kv heads, E head dim, F ffn hidden.
Parameter names follow Hugging Face's (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) so that
conversion is a name template.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.ops import Ops
from pretrain.models.rope import inverse_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)

    @property
    def fused_add(self) -> bool:
        """Whether ``add`` is one kernel (the Triton norm) rather than an add and this norm."""
        return "rms_norm" in self.ops.triton

    def add(self, x, residual):
        """(x + residual, this norm of it): a pre-norm block's residual add and the next norm."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    @property
    def fused_add(self) -> bool:
        return "layer_norm" in self.ops.triton

    def add(self, x, residual):
        return self.ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, ``x`` in the dtype the matmuls take: a normed activation that several projections read
    (q, k and v; gate and up) is cast once, not once per projection — and its gradients are summed in that dtype
    before one cast back. Outside autocast (fp32 runs) it is ``x`` itself."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if x.dtype != dtype and x.dtype in (torch.float32, torch.float64):
            return x.to(dtype)
    return x


class Documents:
    """The packed documents of a batch (``data.document_mask``): ``ids`` (B, T) integers, equal ids side by side
    forming one document — a token attends only within its own —, and ``positions`` (B, T), the tokens' positions
    when they restart at each document (``data.reset_positions``; None: 0..T-1). ``branches`` (B, T) integers, in
    scoring only (``pretrain/downstream.py``: one context, several continuations after it): within a document, a
    token of branch b > 0 sees the document's branch-0 tokens (the shared context) and its own branch's, not the
    other branches' — a prefix tree in one row, run by the dense reference attention."""

    def __init__(self, ids: torch.Tensor | None, positions: torch.Tensor | None = None,
                 branches: torch.Tensor | None = None):
        self.ids, self.positions, self.branches = ids, positions, branches

    @classmethod
    def of(cls, document_ids, positions, branch_ids=None) -> Documents | None:
        if document_ids is None and positions is None and branch_ids is None:
            return None
        return cls(document_ids, positions, branch_ids)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """RoPE in Hugging Face's rotate-half convention (Su et al. 2021), cos/sin cached in fp32; ``scaling`` is
    ``model.rope_scaling`` (models/rope.py), folded into the tables."""

    def __init__(self, head_dim: int, theta: float, max_len: int, ops: Ops | None = None, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.max_len, self.scaling = head_dim, theta, max_len, dict(scaling or {})
        self.ops = ops or Ops("torch")
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device=None):
        device = device or (self.cos.device if self.cos.device.type != "meta" else None)
        inv_freq, attention_factor = inverse_frequencies(self.head_dim, self.theta, self.scaling, device)
        t = torch.arange(self.max_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (T, E/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, E)
        self.cos, self.sin = emb.cos() * attention_factor, emb.sin() * attention_factor

    def forward(self, q, k, positions: torch.Tensor | None = None):
        """q (B, H, T, E), k (B, K, T, E) -> rotated, same shapes and dtypes. ``positions``: the tokens' positions
        when they are not 0..T-1 — (T,) for a context-parallel rank's chunks, (B, T) where they restart at each
        packed document (then at most T - 1: no host sync to size the tables)."""
        if positions is None:
            t = q.shape[-2]
        elif positions.dim() == 2:
            t = positions.shape[1]
        else:
            t = int(positions.max()) + 1
        if t > self.cos.shape[0]:
            self.max_len = t
            self.reset_parameters(q.device)
        if positions is None:
            cos, sin = self.cos[:t], self.sin[:t]
        elif positions.dim() == 2:  # (B, 1, T, E): one table a row, shared by the heads
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return self.ops.rotary(q, cos, sin), self.ops.rotary(k, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, *, causal: bool, bias: bool):
        """``bias``: on every projection (gpt2, bert); ``model.qkv_bias`` adds them to q, k, v only (Qwen2)."""
        super().__init__()
        self.ops, self.causal, self.dropout = ops, causal, cfg.dropout
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        d, qkv_bias = cfg.d_model, bias or getattr(cfg, "qkv_bias", False)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.context = None  # context parallelism (parallel/context_parallel.py) replaces the attention op
        qk_norm = getattr(cfg, "qk_norm", False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, ops) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, ops) if qk_norm else None
        # for a step, a function computing q, k and v as one (..., (H + 2K)·E) projection (parallel/
        # mixed_precision.py sets it over its bf16 copies; the parameters stay q_proj, k_proj and v_proj)
        self.qkv = None

    def _projections(self, x):
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)  # three views of one output

    def forward(self, x, rotary: Rotary | None = None, key_padding_mask=None, documents: Documents | None = None):
        """``documents``: the batch's packed documents (attention within each, RoPE positions restarting with
        them), or None."""
        b, t, _ = x.shape
        q, k, v = self._projections(x)
        q = q.view(b, t, -1, self.head_dim)  # (B, T, H, E)
        k = k.view(b, t, -1, self.head_dim)  # (B, T, K, E)
        if self.q_norm is not None:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, E), (B, K, T, E)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        if self.context is not None:  # this rank's chunks of the sequence: their positions, attention over all
            if rotary is not None:
                restarted = documents.positions if documents is not None else None  # split like the tokens
                q, k = rotary(q, k, restarted if restarted is not None else self.context.positions(t, q.device))
            if documents is not None and documents.branches is not None:
                raise ValueError("branch ids (prefix-tree scoring) are not supported under context parallelism")
            # the document ids stay whole under context parallelism (the other ranks' chunks' documents)
            y = self.context(q, k, v, document_ids=documents.ids if documents is not None else None)
        else:
            if rotary is not None:
                q, k = rotary(q, k, documents.positions if documents is not None else None)
            extra = {"dropout_p": self.dropout} if self.training and self.dropout else {}
            if documents is not None and documents.ids is not None:
                extra["document_ids"] = documents.ids
            if documents is not None and documents.branches is not None:  # scoring: the dense reference's mask
                from pretrain.models.ops import torch_attention

                y = torch_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                    branch_ids=documents.branches, **extra)
            else:
                y = self.ops.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, **extra)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, H*E)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (llama: down(silu(gate(x)) * up(x)), Shazeer 2020) or a plain GELU MLP (gpt2, bert)."""

    def __init__(self, cfg: ModelConfig, *, gated: bool, bias: bool, gelu_approximate: str = "none",
                 hidden: int | None = None, ops: Ops | None = None):
        super().__init__()
        d, f = cfg.d_model, hidden or cfg.ffn_dim
        self.gated, self.gelu_approximate = gated, gelu_approximate
        self.ops = ops or Ops()
        self.gate_proj = nn.Linear(d, f, bias=bias) if gated else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        # for a step, a function computing gate and up as one (..., 2F) projection (parallel/mixed_precision.py
        # sets it over its bf16 copies; the parameters stay gate_proj and up_proj)
        self.gate_up = None

    def forward(self, x):
        if self.gated and self.gate_up is not None:
            return self.down_proj(self.ops.swiglu_packed(self.gate_up(x)))
        if self.gated:
            return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximate))


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2 / Megatron init: N(0, std) everywhere, residual output projections N(0, std / sqrt(2·layers))."""
    first = next(model.parameters(), None)
    if first is not None and first.is_meta:
        return  # built on the meta device: nothing to fill (the owner calls this again after ``to_empty``)
    residual_std = std / math.sqrt(2 * n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_residual = name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, LayerNorm, Rotary)):
            module.reset_parameters()
        elif hasattr(module, "reset_experts"):  # MoE: stacked expert weights and the router, not Linear modules
            module.reset_experts(std, residual_std)
