"""FlashAttention-2 (Dao 2023) in Triton: forward and backward, causal or not, key-padding mask, GQA.

Forward, per (batch, head, block of BLOCK_M queries): stream the key/value blocks, keep a running max m, sum l
and output accumulator (online softmax, Milakov & Gimelshein 2018), never materialising the T × T scores; store
O = acc / l and the log-sum-exp L = m + log l (4 bytes a row) for the backward. Causal programs stop at the
diagonal. A query head h reads key/value head h // (H / K) directly: repeated K/V never exist.
Backward (recompute, no stored probabilities): Δ = rowsum(dO ∘ O); one kernel per key/value block accumulates
dV = Pᵀ dO and dK = scale · dSᵀ Q over the query blocks, another per query block dQ = scale · dS K, with
P = exp(scale · QKᵀ - L) and dS = P ∘ (dO Vᵀ - Δ). Key/value gradients of a GQA group are summed over its heads.
Head dims up to 256, any size (non-powers of two are padded in registers and masked). Matmuls take the inputs'
dtype (tensor cores for fp16 / bf16) and accumulate in fp32; softmax statistics are fp32. FLOPs: forward 4·B·H·T²·E (half with causal), backward 2.5× that.
"""

from __future__ import annotations

import os

import torch

from kernels._common import check_device, check_dtypes, next_power_of_2, require_triton

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MAX_HEAD_DIM = 256
NEG = -1.0e30  # a finite "minus infinity": fully masked rows stay NaN-free


def _block() -> int:
    return 16 if os.environ.get("TRITON_INTERPRET") == "1" else 64


@triton.jit
def _allowed(offs_m, offs_n, T, MASK_ROW, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    ok = (offs_n[None, :] < T) & (offs_m[:, None] < T)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        keep = tl.load(MASK_ROW + offs_n, mask=offs_n < T, other=0)
        ok = ok & (keep[None, :] != 0)
    return ok


@triton.jit
def _attn_fwd_kernel(Q, K, V, OUT, L, MASK, scale, T, H, KV_GROUP, E,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    kvh = b * (H // KV_GROUP) + (bh % H) // KV_GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    q = tl.load(Q + bh * T * E + offs_m[:, None] * E + offs_e[None, :],
                mask=(offs_m[:, None] < T) & (offs_e[None, :] < E), other=0.0)
    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    end = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < T) & (offs_e[None, :] < E)
        k = tl.load(K + kvh * T * E + offs_n[:, None] * E + offs_e[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kvh * T * E + offs_n[:, None] * E + offs_e[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        ok = _allowed(offs_m, offs_n, T, MASK + b * T, CAUSAL, HAS_MASK)
        s = tl.where(ok, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    safe_l = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / safe_l[:, None]
    tl.store(OUT + bh * T * E + offs_m[:, None] * E + offs_e[None, :], out.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_e[None, :] < E))
    tl.store(L + bh * T + offs_m, m_i + tl.log(safe_l), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, L, DELTA, DK, DV, MASK, scale, T, H, KV_GROUP, E,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // H
    kvh = b * (H // KV_GROUP) + (bh % H) // KV_GROUP
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    kv_mask = (offs_n[:, None] < T) & (offs_e[None, :] < E)
    k = tl.load(K + kvh * T * E + offs_n[:, None] * E + offs_e[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kvh * T * E + offs_n[:, None] * E + offs_e[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    begin = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(begin, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < T) & (offs_e[None, :] < E)
        q = tl.load(Q + bh * T * E + offs_m[:, None] * E + offs_e[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + bh * T * E + offs_m[:, None] * E + offs_e[None, :], mask=q_mask, other=0.0)
        lse = tl.load(L + bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        ok = _allowed(offs_m, offs_n, T, MASK + b * T, CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # (M, N)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    out = bh * T * E + offs_n[:, None] * E + offs_e[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, L, DELTA, DQ, MASK, scale, T, H, KV_GROUP, E,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    kvh = b * (H // KV_GROUP) + (bh % H) // KV_GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    q_mask = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    q = tl.load(Q + bh * T * E + offs_m[:, None] * E + offs_e[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + bh * T * E + offs_m[:, None] * E + offs_e[None, :], mask=q_mask, other=0.0)
    lse = tl.load(L + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    end = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < T) & (offs_e[None, :] < E)
        k = tl.load(K + kvh * T * E + offs_n[:, None] * E + offs_e[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kvh * T * E + offs_n[:, None] * E + offs_e[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        ok = _allowed(offs_m, offs_n, T, MASK + b * T, CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + bh * T * E + offs_m[:, None] * E + offs_e[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _check(q, k, v, key_padding_mask):
    tensors = [q, k, v] + ([key_padding_mask] if key_padding_mask is not None else [])
    check_device(*tensors)
    check_dtypes(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"flash_attention takes q (B, H, T, E), k and v (B, K, T, E); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, t, e = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != e or h % k.shape[1]:
        raise ValueError(f"k / v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same B, T, E and K dividing H")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if e > MAX_HEAD_DIM:
        raise ValueError(f"head dim {e} exceeds the supported maximum {MAX_HEAD_DIM}")
    if key_padding_mask is not None and key_padding_mask.shape != (b, t):
        raise ValueError(f"key_padding_mask must be (B, T) = ({b}, {t}), got {tuple(key_padding_mask.shape)}")


# The launches are registered as custom ops so torch.compile treats them as opaque calls.
@torch.library.custom_op("pretrain::flash_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool,
                  has_mask: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t, e = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    block = _block()
    _attn_fwd_kernel[(triton.cdiv(t, block), b * h)](q, k, v, out, lse, mask, scale, t, h, h // k.shape[1], e,
                                                     CAUSAL=causal, HAS_MASK=has_mask, BLOCK_M=block, BLOCK_N=block,
                                                     BLOCK_E=max(16, next_power_of_2(e)))
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, mask, causal, has_mask, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pretrain::flash_attention_bwd", mutates_args=())
def attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  mask: torch.Tensor, dout: torch.Tensor, causal: bool, has_mask: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, e = q.shape
    kv_heads = k.shape[1]
    group = h // kv_heads
    delta = (dout.float() * out.float()).sum(-1)  # (B, H, T)
    dq = torch.empty_like(q)
    dk_heads = torch.empty(b, h, t, e, dtype=q.dtype, device=q.device)  # per query head, summed below
    dv_heads = torch.empty_like(dk_heads)
    block = _block()
    meta = {"CAUSAL": causal, "HAS_MASK": has_mask, "BLOCK_M": block, "BLOCK_N": block,
            "BLOCK_E": max(16, next_power_of_2(e))}
    _attn_bwd_dkdv_kernel[(triton.cdiv(t, block), b * h)](q, k, v, dout, lse, delta, dk_heads, dv_heads, mask,
                                                         scale, t, h, group, e, **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(t, block), b * h)](q, k, v, dout, lse, delta, dq, mask, scale, t, h, group, e,
                                                       **meta)
    return dq, dk_heads.view(b, kv_heads, group, t, e).sum(2), dv_heads.view(b, kv_heads, group, t, e).sum(2)


@attention_bwd.register_fake
def _(q, k, v, out, lse, mask, dout, causal, has_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, scale):
        _check(q, k, v, key_padding_mask)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        has_mask = key_padding_mask is not None
        mask = key_padding_mask.to(torch.int8).contiguous() if has_mask else q.new_zeros(1, dtype=torch.int8)
        out, lse = attention_fwd(q, k, v, mask, bool(causal), has_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.has_mask = bool(causal), scale, has_mask
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = attention_bwd(q, k, v, out, lse, mask, dout.contiguous(), ctx.causal, ctx.has_mask, ctx.scale)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal: bool = True, key_padding_mask=None, scale=None, dropout_p: float = 0.0):
    """q (B, H, T, E); k, v (B, K, T, E) with K dividing H; key_padding_mask (B, T) bool, True = keep."""
    if dropout_p:
        raise ValueError("the Triton attention has no dropout: set model.dropout = 0 or model.kernels = \"torch\"")
    return FlashAttentionFunction.apply(q, k, v, causal, key_padding_mask, scale)
