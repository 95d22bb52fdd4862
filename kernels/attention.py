"""FlashAttention-2 (Dao 2023) in Triton: forward and backward, causal or not, key-padding mask, GQA.

Forward, per (batch, head, block of BLOCK_M queries): stream the key/value blocks, keep a running max m, sum l
and output accumulator (online softmax, Milakov & Gimelshein 2018), never materialising the T × T scores; store
O = acc / l and the log-sum-exp L = m + log l (natural log, 4 bytes a row) for the backward. Scores live in the
log2 domain (log2 e folded into the scale, ``exp2``). Causal programs stop at the diagonal, and the key blocks
left of it run without any mask: only the diagonal blocks (and, bidirectionally, the last partial block) build
the element-wise mask. A query head h reads key/value head h // (H / K) directly: repeated K/V never exist.
Backward (recompute, no stored probabilities): Δ = rowsum(dO ∘ O) in its own kernel; one kernel per key/value
block and kv head accumulates dV = Pᵀ dO and dK = scale · dSᵀ Q over the query blocks of every query head of
its GQA group (no per-query-head temporaries), with P = exp(scale · QKᵀ - L) and dS = P ∘ (dO Vᵀ - Δ), and adds
each block pair's dQ = scale · dS K atomically into an fp32 accumulator (one pass: 5 matmuls a block pair, as
FlashAttention-2); ``PRETRAIN_ATTENTION_BACKWARD=split`` runs dQ in a kernel of its own per query block instead,
recomputing S and dP (7 matmuls, deterministic). Both are computed transposed where that keeps the long tile
dimension first (the M of Hopper's warpgroup MMA).
Layout: q, k, v are (B, H, T, E) views with any strides whose last one is 1 — the model's transposed
(B, T, H, E) projections go in without a copy, and the output is written (B, T, H, E)-contiguous, so the
model's reshape back to (B, T, H·E) is free. Head dims up to 256 (non-powers of two are padded in registers
and masked); the value head dim Ev may differ from the query/key one E (multi-head latent attention: 192 / 128),
q and k (B, ·, T, E), v and the output (B, ·, T, Ev), each padded to its own register width. Matmuls take the inputs' dtype (tensor cores for fp16 / bf16) and accumulate in fp32; fp32
inputs use full-precision (IEEE) dots. Block sizes are autotuned per target from candidate lists that the
compile gate (``pretrain.kernels.compile_check``) compiles for sm_80, sm_90a and sm_100a.
FLOPs: forward 4·B·H·T²·E (half with causal), backward 2.5× that (split: 3.5×).
"""

from __future__ import annotations

import torch

from pretrain.kernels._common import (
    autotuned,
    check_device,
    check_dtypes,
    interpreting,
    nbytes,
    next_power_of_2,
    require_triton,
    seq_bucket,
)

# document_bounds: re-exported (the kernels' input)
from pretrain.kernels.reference import batch_document_bounds, document_bounds  # noqa: F401

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MAX_HEAD_DIM = 256
NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity": fully masked rows stay NaN-free
LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)


def _cfg(block_m: int, block_n: int, warps: int, stages: int):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidates per (arch class, head-dim class). Sources: FlashAttention-2 (Dao 2023, §3.3: 128-row query tiles
# with 4–8 warps, smaller key tiles as the head dim grows) and the Triton fused-attention tutorial's Hopper
# configs (BLOCK_M 128, BLOCK_N 64/128, 8 warps, 3 stages); the backward follows its 32×128 (dK/dV) and 128×32
# (dQ) split. Each list was pruned to what the compile gate shows fitting without spills: head dim 256 takes
# smaller tiles and fewer stages (its tiles alone are 4× the head-dim-64 ones), and with triton 3.6 (the GPU
# image's) five 4-warp candidates spilled 8–24 B (head dim 256 forward / dQ on sm_80 and sm_90a, one head-dim-128
# dK/dV on sm_100a): their 8-warp twins (half the registers a thread) or a 32-row tile replace them. Rules:
# forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV needs BLOCK_N % BLOCK_M == 0 (the causal split). The 192 class is multi-head latent
# attention's pair (q/k 192 padded to 256, v 128): its forward and dQ lists are the 256 ones (one 4-warp forward
# candidate on sm_80 spilled 8 B: 8 warps instead), while its dK/dV tiles spilled 32–416 B at 32×32 and 16×64
# (the 256-wide dK beside a 128-wide dV): 16-row by 32-key tiles only.
FWD_CONFIGS = {
    (80, 64): [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    (80, 128): [_cfg(128, 32, 8, 3), _cfg(64, 32, 4, 3)],
    (80, 256): [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],
    (90, 64): [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3)],
    (90, 128): [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    (90, 256): [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)],
    (100, 64): [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3)],
    (100, 128): [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    (100, 256): [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)],
    (80, 192): [_cfg(64, 32, 8, 2), _cfg(32, 32, 8, 2)],
    (90, 192): [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)],
    (100, 192): [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)],
}
DKDV_CONFIGS = {
    (80, 64): [_cfg(32, 128, 8, 2), _cfg(32, 64, 8, 3)],
    (80, 128): [_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 2)],
    (80, 256): [_cfg(16, 32, 4, 1), _cfg(16, 32, 8, 1)],
    (90, 64): [_cfg(32, 128, 8, 3), _cfg(32, 64, 8, 3)],
    (90, 128): [_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 2)],
    (90, 256): [_cfg(32, 32, 8, 2), _cfg(16, 32, 8, 2)],
    (100, 64): [_cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3)],
    (100, 128): [_cfg(16, 64, 8, 2), _cfg(16, 32, 8, 2)],
    (100, 256): [_cfg(32, 32, 8, 2), _cfg(16, 32, 8, 2)],
    (80, 192): [_cfg(16, 32, 4, 1), _cfg(16, 32, 8, 1)],
    (90, 192): [_cfg(16, 32, 8, 2), _cfg(16, 32, 8, 3)],
    (100, 192): [_cfg(16, 32, 8, 2), _cfg(16, 32, 8, 3)],
}
# The one-pass backward (the dK/dV kernel with WITH_DQ: a dQ tile and its atomic add beside dK, dV) holds more
# registers: from the dK/dV lists, the candidates the compile gate showed spilling with it (sm_80 head dim 64
# causal 8–16 B, 256 with 4 warps 16 B; sm_90a 32×64 at head dim 128: 88 B; sm_100a head dim 64 padded 8 B) are
# replaced by narrower query tiles or 8 warps (key tiles of 64 or more on sm_90a: 32 gets no HGMMA there).
ONE_PASS_CONFIGS = {
    (80, 64): [_cfg(16, 64, 8, 2), _cfg(16, 128, 8, 2)],
    (80, 128): [_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 2)],
    (80, 256): [_cfg(16, 32, 8, 1)],
    (90, 64): [_cfg(32, 128, 8, 3), _cfg(32, 64, 8, 3)],
    (90, 128): [_cfg(16, 64, 8, 2), _cfg(16, 64, 8, 3)],
    (90, 256): [_cfg(32, 32, 8, 2), _cfg(16, 32, 8, 2)],
    (100, 64): [_cfg(32, 64, 8, 3), _cfg(16, 64, 4, 3)],
    (100, 128): [_cfg(16, 64, 8, 2), _cfg(16, 32, 8, 2)],
    (100, 256): [_cfg(32, 32, 8, 2), _cfg(16, 32, 8, 2)],
    (80, 192): [_cfg(16, 32, 8, 1)],
    (90, 192): [_cfg(16, 32, 8, 2), _cfg(16, 32, 8, 3)],
    (100, 192): [_cfg(16, 32, 8, 2), _cfg(16, 32, 8, 3)],
}
DQ_CONFIGS = {
    (80, 64): [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 2)],
    (80, 128): [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)],
    (80, 256): [_cfg(64, 16, 8, 1), _cfg(32, 32, 4, 1)],
    (90, 64): [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3)],
    (90, 128): [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3)],
    (90, 256): [_cfg(64, 32, 8, 2), _cfg(64, 16, 4, 2)],
    (100, 64): [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3)],
    (100, 128): [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3)],
    (100, 256): [_cfg(64, 32, 4, 2), _cfg(64, 16, 4, 2)],
    (80, 192): [_cfg(64, 16, 8, 1), _cfg(32, 32, 4, 1)],
    (90, 192): [_cfg(64, 32, 8, 2), _cfg(64, 16, 4, 2)],
    (100, 192): [_cfg(64, 32, 4, 2), _cfg(64, 16, 4, 2)],
}
# With document masking (HAS_DOCS: each token's document start compared per block pair, the side a loop does not
# move kept in registers) the compile gate showed these candidates spilling 8–48 B with one triton or both; the
# variant takes the lists without them. No one-pass dK/dV candidate at head dim 128 fits sm_90a with documents
# (16×64 with 1–3 stages, 16×128, 4 warps: 8–128 B with one triton or the other), so there the document-masked
# backward runs split (``one_pass_available``): 7 matmuls a block pair instead of 5, on fewer blocks.
FWD_DOC_CONFIGS = dict(FWD_CONFIGS)
DKDV_DOC_CONFIGS = {**DKDV_CONFIGS, (90, 128): [_cfg(16, 64, 8, 2)], (100, 128): [_cfg(16, 32, 8, 2)]}
ONE_PASS_DOC_CONFIGS = {key: configs for key, configs in {
    **ONE_PASS_CONFIGS, (80, 64): [_cfg(16, 64, 8, 2)], (80, 128): [_cfg(16, 64, 8, 2)],
    (100, 64): [_cfg(16, 64, 4, 3)]}.items() if key != (90, 128)}
INTERPRETER_CONFIG = _cfg(16, 16, 4, 1)


def arch_class(arch: int) -> int:
    """Hopper (sm_90) and data-centre Blackwell (sm_100 / 103) have their own lists (228 KiB of shared memory a
    block; warpgroup MMA, tcgen05); everything else from sm_80 on takes the A100 ones (sm_86 / 89 / 120 have less
    shared memory: their picks are not in the compile gate)."""
    return 90 if arch == 90 else 100 if 100 <= arch < 110 else 80


def head_dim_class(block_e: int, block_ev: int | None = None) -> int:
    """The candidate lists of a (query/key, value) register-width pair: 64, 128 or 256 by the wider one, and 192
    for multi-head latent attention's pair (query/key up to 256 wide, value up to 128: DeepSeek-V3's 192 / 128),
    whose lists the compile gate pruned of what spills there (the asymmetric tiles do not always fit where the
    256 / 256 ones do)."""
    block_ev = block_e if block_ev is None else block_ev
    if block_e > 128 and block_ev <= 128:
        return 192
    wide = max(block_e, block_ev)
    return 64 if wide <= 64 else 128 if wide <= 128 else 256


def _choose(arch, named_args, kwargs):
    return arch_class(arch), head_dim_class(kwargs["BLOCK_E"], kwargs["BLOCK_EV"])


KEY = ["T_BUCKET", "BLOCK_E", "BLOCK_EV", "SPLIT_V", "CAUSAL", "HAS_MASK", "HAS_DOCS"]  # and the tensors' dtypes, which triton.autotune adds
BACKWARDS = ("one_pass", "split")


def one_pass_available(block_e: int, documents: bool, block_ev: int | None = None) -> bool:
    """Whether the one-pass backward has a candidate that fits this GPU (always in the interpreter)."""
    if not documents or interpreting():
        return True
    from pretrain.kernels._common import current_arch

    return (arch_class(current_arch()), head_dim_class(block_e, block_ev)) in ONE_PASS_DOC_CONFIGS


def backward_kind() -> str:
    """Which backward runs: ``one_pass`` (the default: dK, dV and dQ from one kernel, dQ added atomically in fp32,
    FlashAttention-2's 5 matmuls a block pair) or ``split`` (a dK/dV kernel and a dQ kernel, each recomputing S and
    dP: 7 matmuls, deterministic) — ``PRETRAIN_ATTENTION_BACKWARD``, until a GPU has timed both."""
    import os

    kind = os.environ.get("PRETRAIN_ATTENTION_BACKWARD", "one_pass")
    if kind not in BACKWARDS:
        raise ValueError(f"PRETRAIN_ATTENTION_BACKWARD = {kind!r} is not one of {', '.join(BACKWARDS)}")
    return kind


@triton.jit
def _doc_ids(ROW, offs, T, other, HAS_DOCS: tl.constexpr):
    """The document starts of tokens ``offs`` (``other`` past T), or zeros without documents (then unread)."""
    if HAS_DOCS:
        ids = tl.load(ROW + offs, mask=offs < T, other=other)
    else:
        ids = offs * 0
    return ids


@triton.jit
def _score_mask(offs_m, offs_n, T, MASK_ROW, doc_q, doc_k, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_DOCS: tl.constexpr):
    """(M, N) keep-mask of queries offs_m against keys offs_n: keys inside T, causal, key padding, and with
    documents the same document (doc_q / doc_k: each query's / key's document start, in one coordinate; loaded by
    the caller, which keeps the side its loop does not move in registers)."""
    ok = offs_n[None, :] < T
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        keep = tl.load(MASK_ROW + offs_n, mask=offs_n < T, other=0)
        ok = ok & (keep[None, :] != 0)
    if HAS_DOCS:
        ok = ok & (doc_q[:, None] == doc_k[None, :])
    return ok


@triton.jit
def _first_key(DOC_ROW, start, OFFSET, BLOCK: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The first block (of BLOCK tokens) of the other side a block of rows from ``start`` can see: 0, or with
    documents the block holding the start of the first row's document (``OFFSET``: where the other side's token 0
    lies in the documents' coordinate) — every block before it lies wholly in earlier documents and is skipped (no
    loads, no FLOPs)."""
    if HAS_DOCS:
        return (tl.maximum(tl.load(DOC_ROW + start) - OFFSET, 0) // BLOCK) * BLOCK
    return 0


@triton.jit
def _last_key(END_ROW, last, OFFSET, T, HAS_DOCS: tl.constexpr):
    """One past the last token of the other side rows up to ``last`` can see without a causal limit: T, or with
    documents the end of the last row's document (clipped to [0, T])."""
    if HAS_DOCS:
        return tl.minimum(tl.maximum(tl.load(END_ROW + last) - OFFSET, 0), T)
    return T


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K_BASE, V_BASE, MASK_ROW, doc_q, KDOC_ROW, stride_kt, stride_vt, offs_m, offs_e,
                offs_ev, lo, hi, T, qk_scale, E, EV, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_DOCS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K_BASE + offs_n[:, None] * stride_kt + offs_e[None, :],
                    mask=(offs_n[:, None] < T) & (offs_e[None, :] < E), other=0.0)
        v = tl.load(V_BASE + offs_n[:, None] * stride_vt + offs_ev[None, :],
                    mask=(offs_n[:, None] < T) & (offs_ev[None, :] < EV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (M, N), log2 domain
        if MASKED or HAS_MASK or HAS_DOCS:
            doc_k = _doc_ids(KDOC_ROW, offs_n, T, -2, HAS_DOCS)
            ok = _score_mask(offs_m, offs_n, T, MASK_ROW, doc_q, doc_k, CAUSAL and MASKED, HAS_MASK, HAS_DOCS)
            s = tl.where(ok, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        if MASKED or HAS_MASK or HAS_DOCS:
            p = tl.where(ok, p, 0.0)  # a row masked so far has m_new = NEG and would give exp2(0)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["H", "KV_GROUP", "T_BUCKET"])
def _attn_fwd_kernel(Q, K, V, OUT, LSE, MASK, DOCS, KDOCS, Q0, K0, qk_scale, T, H, KV_GROUP, E, EV,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, T_BUCKET,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_EV: tl.constexpr, SPLIT_V: tl.constexpr = False, HAS_DOCS: tl.constexpr = False):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // KV_GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    q_mask = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_e[None, :], mask=q_mask,
                other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    mask_row = MASK + b * T
    # each query's document start and end (DOCS), each key's (KDOCS): (2, B, T) in a coordinate where query i is
    # at Q0 + i and key j at K0 + j (one tensor and 0, 0 unless context parallelism pairs two chunks)
    doc_row = DOCS + b * T
    end_row = DOCS + (tl.num_programs(1) // H + b) * T
    kdoc_row = KDOCS + b * T
    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SPLIT_V:  # a value head dim of its own (MLA)
        offs_ev = tl.arange(0, BLOCK_EV)
    else:  # one head dim: the value's columns and bounds are the query/key ones (no second mask in registers)
        offs_ev = offs_e
        EV = E
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    lo = _first_key(doc_row, start_m, K0, BLOCK_N, HAS_DOCS)
    if CAUSAL:  # whole key blocks left of this query block, then the diagonal
        full_end = start_m
        end = tl.minimum(start_m + BLOCK_M, T)
    elif HAS_DOCS:  # the key blocks of the query block's documents, each masked
        full_end = lo
        end = _last_key(end_row, tl.minimum(start_m + BLOCK_M, T) - 1, K0, T, HAS_DOCS)
    else:  # whole key blocks, then the partial last one
        full_end = (T // BLOCK_N) * BLOCK_N
        end = T
    doc_q = _doc_ids(doc_row, offs_m, T, -1, HAS_DOCS)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_row, doc_q, kdoc_row, stride_kt, stride_vt,
                                offs_m, offs_e, offs_ev, lo, full_end, T, qk_scale, E, EV, False, CAUSAL, HAS_MASK,
                                HAS_DOCS,
                                BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_row, doc_q, kdoc_row, stride_kt, stride_vt,
                                offs_m, offs_e, offs_ev, full_end, end, T, qk_scale, E, EV, True, CAUSAL, HAS_MASK,
                                HAS_DOCS,
                                BLOCK_N, PRECISION)
    safe_l = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / safe_l[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_ev[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < T) & (offs_ev[None, :] < EV))
    tl.store(LSE + bh * T + offs_m, (m_i + tl.log2(safe_l)) * LN2_C, mask=offs_m < T)


@triton.jit(do_not_specialize=["H"])
def _attn_bwd_delta_kernel(OUT, DO, DELTA, T, H, E, stride_ob, stride_oh, stride_ot, stride_db, stride_dh,
                           stride_dt, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Δ = rowsum(dO ∘ O), fp32, (B, H, T)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_e = tl.arange(0, BLOCK_E)
    inside = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_e[None, :], mask=inside,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_e[None, :], mask=inside,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q_BASE, DO_BASE, LSE_ROW, DELTA_ROW, MASK_ROW, DOC_ROW, doc_k, DQ_BASE, stride_qt,
                 stride_dot, offs_n, offs_e, offs_ev, lo, hi, T, qk_scale, scale, E, EV, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, WITH_DQ: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """Key block offs_n against query blocks [lo, hi), transposed: (N, M) scores. Queries past T load as zero
    (q, dO, L, Δ), which makes their contributions exactly zero. ``WITH_DQ``: also add this key block's share of
    dQ = scale · dS K into the fp32 accumulator at DQ_BASE ((T, BLOCK_E) rows, atomically: other key blocks add
    to the same rows) — the one-pass backward, which recomputes neither S nor dP in a second kernel."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(Q_BASE + offs_m[:, None] * stride_qt + offs_e[None, :],
                    mask=(offs_m[:, None] < T) & (offs_e[None, :] < E), other=0.0)
        do = tl.load(DO_BASE + offs_m[:, None] * stride_dot + offs_ev[None, :],
                     mask=(offs_m[:, None] < T) & (offs_ev[None, :] < EV), other=0.0)
        lse = tl.load(LSE_ROW + offs_m, mask=offs_m < T, other=0.0) * LOG2E_C
        delta = tl.load(DELTA_ROW + offs_m, mask=offs_m < T, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (N, M)
        pt = tl.exp2(st - lse[None, :])
        if MASKED or HAS_MASK or HAS_DOCS:
            doc_q = _doc_ids(DOC_ROW, offs_m, T, -1, HAS_DOCS)
            ok = tl.trans(_score_mask(offs_m, offs_n, T, MASK_ROW, doc_q, doc_k, MASKED, HAS_MASK, HAS_DOCS))
            pt = tl.where(ok, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (N, M)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        if WITH_DQ:
            dq = tl.dot(tl.trans(dst).to(k.dtype), k, input_precision=PRECISION) * scale  # (M, E)
            tl.atomic_add(DQ_BASE + offs_m[:, None] * BLOCK_E + offs_e[None, :], dq, mask=offs_m[:, None] < T,
                          sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["H", "KV_GROUP", "T_BUCKET"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, MASK, DOCS, KDOCS, Q0, K0, qk_scale, scale, T, H,
                          KV_GROUP, E, EV,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, T_BUCKET,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                          BLOCK_EV: tl.constexpr, SPLIT_V: tl.constexpr = False, WITH_DQ: tl.constexpr = False,
                          HAS_DOCS: tl.constexpr = False):
    start_n = tl.program_id(0) * BLOCK_N
    bk = tl.program_id(1)  # b · K + kv head
    kv_heads = H // KV_GROUP
    b = bk // kv_heads
    kvh = bk % kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    if SPLIT_V:  # a value head dim of its own (MLA)
        offs_ev = tl.arange(0, BLOCK_EV)
    else:  # one head dim: the value's columns and bounds are the query/key ones (no second mask in registers)
        offs_ev = offs_e
        EV = E
    kv_mask = (offs_n[:, None] < T) & (offs_e[None, :] < E)
    v_mask = (offs_n[:, None] < T) & (offs_ev[None, :] < EV)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_e[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_ev[None, :], mask=v_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)
    mask_row = MASK + b * T
    doc_row = DOCS + b * T
    kdoc_row = KDOCS + b * T
    kend_row = KDOCS + (tl.num_programs(1) // kv_heads + b) * T
    # with documents, the query blocks of this key block's documents only: from the first key's document start
    # (bidirectional; causal starts at the diagonal anyway) to the last key's document end
    q_end = _last_key(kend_row, tl.minimum(start_n + BLOCK_N, T) - 1, Q0, T, HAS_DOCS)
    q_lo = _first_key(kdoc_row, start_n, Q0, BLOCK_M, HAS_DOCS)
    doc_k = _doc_ids(kdoc_row, offs_n, T, -2, HAS_DOCS)
    for g in range(KV_GROUP):  # every query head of this kv head's group, summed in registers
        h = kvh * KV_GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_row = LSE + (b * H + h) * T
        delta_row = DELTA + (b * H + h) * T
        dq_base = DQ + (b * H + h).to(tl.int64) * T * BLOCK_E
        if CAUSAL:  # the diagonal query blocks (masked), then every later one (unmasked)
            diag_end = start_n + BLOCK_N
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_row, delta_row, mask_row, doc_row, doc_k,
                                  dq_base, stride_qt, stride_dot, offs_n, offs_e, offs_ev, start_n, tl.minimum(diag_end, T), T,
                                  qk_scale, scale, E, EV, True, HAS_MASK, HAS_DOCS, BLOCK_M, PRECISION, WITH_DQ, BLOCK_E)
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_row, delta_row, mask_row, doc_row, doc_k,
                                  dq_base, stride_qt, stride_dot, offs_n, offs_e, offs_ev, diag_end, q_end, T, qk_scale, scale, E,
                                  EV, False,
                                  HAS_MASK, HAS_DOCS, BLOCK_M, PRECISION, WITH_DQ, BLOCK_E)
        else:
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_row, delta_row, mask_row, doc_row, doc_k,
                                  dq_base, stride_qt, stride_dot, offs_n, offs_e, offs_ev, q_lo, q_end, T, qk_scale, scale, E,
                                  EV, False,
                                  HAS_MASK, HAS_DOCS, BLOCK_M, PRECISION, WITH_DQ, BLOCK_E)
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_e[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_ev[None, :],
             dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K_BASE, V_BASE, MASK_ROW, doc_q, KDOC_ROW, stride_kt, stride_vt, offs_m, offs_e,
               offs_ev, lo, hi, T, qk_scale, E, EV, MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Query block offs_m against key blocks [lo, hi). Keys past T load as zero and add nothing to dQ."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K_BASE + offs_n[:, None] * stride_kt + offs_e[None, :],
                    mask=(offs_n[:, None] < T) & (offs_e[None, :] < E), other=0.0)
        v = tl.load(V_BASE + offs_n[:, None] * stride_vt + offs_ev[None, :],
                    mask=(offs_n[:, None] < T) & (offs_ev[None, :] < EV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED or HAS_MASK or HAS_DOCS:
            doc_k = _doc_ids(KDOC_ROW, offs_n, T, -2, HAS_DOCS)
            p = tl.where(_score_mask(offs_m, offs_n, T, MASK_ROW, doc_q, doc_k, MASKED, HAS_MASK, HAS_DOCS), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["H", "KV_GROUP", "T_BUCKET"])
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, MASK, DOCS, KDOCS, Q0, K0, qk_scale, scale, T, H, KV_GROUP, E, EV,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt, T_BUCKET,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_EV: tl.constexpr, SPLIT_V: tl.constexpr = False, HAS_DOCS: tl.constexpr = False):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // KV_GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    q_mask = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_e[None, :], mask=q_mask,
                other=0.0)
    if SPLIT_V:  # a value head dim of its own (MLA)
        offs_ev = tl.arange(0, BLOCK_EV)
    else:  # one head dim: the value's columns and bounds are the query/key ones (no second mask in registers)
        offs_ev = offs_e
        EV = E
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_ev[None, :],
                 mask=(offs_m[:, None] < T) & (offs_ev[None, :] < EV), other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    mask_row = MASK + b * T
    doc_row = DOCS + b * T
    end_row = DOCS + (tl.num_programs(1) // H + b) * T
    kdoc_row = KDOCS + b * T
    lo = _first_key(doc_row, start_m, K0, BLOCK_N, HAS_DOCS)
    doc_q = _doc_ids(doc_row, offs_m, T, -1, HAS_DOCS)
    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    if CAUSAL:
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, mask_row, doc_q, kdoc_row, stride_kt, stride_vt, offs_m,
                        offs_e, offs_ev, lo, start_m, T, qk_scale, E, EV, False, HAS_MASK, HAS_DOCS, BLOCK_N, PRECISION)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, mask_row, doc_q, kdoc_row, stride_kt, stride_vt, offs_m,
                        offs_e, offs_ev, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, E, EV, True, HAS_MASK, HAS_DOCS, BLOCK_N,
                        PRECISION)
    else:
        hi = _last_key(end_row, tl.minimum(start_m + BLOCK_M, T) - 1, K0, T, HAS_DOCS)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, mask_row, doc_q, kdoc_row, stride_kt, stride_vt, offs_m,
                        offs_e, offs_ev, lo, hi, T, qk_scale, E, EV, False, HAS_MASK, HAS_DOCS, BLOCK_N, PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_e[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _choose_docs(arch, named_args, kwargs):
    return (*_choose(arch, named_args, kwargs), bool(kwargs.get("HAS_DOCS")))


def _choose_dkdv(arch, named_args, kwargs):
    return (*_choose_docs(arch, named_args, kwargs), bool(kwargs.get("WITH_DQ")))


FWD_TABLE = {**{(*key, False): configs for key, configs in FWD_CONFIGS.items()},
             **{(*key, True): configs for key, configs in FWD_DOC_CONFIGS.items()}}
_attn_fwd = autotuned(FWD_TABLE, _choose_docs, KEY, INTERPRETER_CONFIG)(_attn_fwd_kernel)
DKDV_TABLE = {**{(*key, False, False): configs for key, configs in DKDV_CONFIGS.items()},
              **{(*key, False, True): configs for key, configs in ONE_PASS_CONFIGS.items()},
              **{(*key, True, False): configs for key, configs in DKDV_DOC_CONFIGS.items()},
              **{(*key, True, True): configs for key, configs in ONE_PASS_DOC_CONFIGS.items()}}
_attn_bwd_dkdv = autotuned(DKDV_TABLE, _choose_dkdv, [*KEY, "WITH_DQ"], INTERPRETER_CONFIG)(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = autotuned(DQ_CONFIGS, _choose, KEY, INTERPRETER_CONFIG)(_attn_bwd_dq_kernel)
TUNED = {"attention_fwd": _attn_fwd, "attention_bwd_dkdv": _attn_bwd_dkdv, "attention_bwd_dq": _attn_bwd_dq}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: any (B, H, T) strides, unit stride along E (copied only when that is not so)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _bht(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _block(e: int) -> int:
    """A head dim's register width: head dims up to 64 share the 64-wide build on GPUs (one compile, the gate's);
    16 in the interpreter."""
    return max(16 if interpreting() else 64, next_power_of_2(e))


def _meta(q: torch.Tensor, v: torch.Tensor, causal: bool, has_mask: bool) -> dict:
    """BLOCK_E: the query/key head dim's width, BLOCK_EV: the value's (the output's)."""
    return {"BLOCK_E": _block(q.shape[-1]), "BLOCK_EV": _block(v.shape[-1]), "SPLIT_V": v.shape[-1] != q.shape[-1],
            "CAUSAL": causal, "HAS_MASK": has_mask, "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


def _check(q, k, v, key_padding_mask, document_ids=None):
    tensors = [q, k, v] + ([key_padding_mask] if key_padding_mask is not None else [])
    if document_ids is not None:
        tensors.append(document_ids)
    check_device(*tensors)
    check_dtypes(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"flash_attention takes q (B, H, T, E), k (B, K, T, E) and v (B, K, T, Ev); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, t, e = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != e or h % k.shape[1]:
        raise ValueError(f"k / v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same B, T, E and K dividing H")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for what, dim in (("head dim", e), ("value head dim", v.shape[-1])):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{what} {dim} exceeds the Triton attention's maximum {MAX_HEAD_DIM} (the largest whose "
                             "tiles fit shared memory on sm_80); use model.kernels = \"torch\"")
    if key_padding_mask is not None and key_padding_mask.shape != (b, t):
        raise ValueError(f"key_padding_mask must be (B, T) = ({b}, {t}), got {tuple(key_padding_mask.shape)}")
    if document_ids is not None and (document_ids.shape != (b, t) or document_ids.is_floating_point()
                                     or document_ids.dtype == torch.bool):
        raise ValueError(f"document_ids must be integers (B, T) = ({b}, {t}), got {document_ids.dtype} "
                         f"{tuple(document_ids.shape)}")


def _out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, Ev) view of a (B, T, H, Ev)-contiguous tensor: the model's reshape to (B, T, H·Ev) is free."""
    b, h, t, _ = q.shape
    return q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)


# The launches are registered as custom ops so torch.compile treats them as opaque calls.
@torch.library.custom_op("pretrain::flash_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool,
                  has_mask: bool, scale: float, docs: torch.Tensor | None = None, kdocs: torch.Tensor | None = None,
                  q0: int = 0, k0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``docs``: ``document_bounds`` of the batch's document ids, or None (one document a row). ``kdocs``, ``q0``,
    ``k0``: where the keys are other tokens than the queries (a context-parallel pair of chunks), the keys' bounds
    and where query 0 and key 0 lie in the coordinate of both bounds (global positions)."""
    b, h, t, e = q.shape
    out = _out_like(q, v)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)
    docs = mask if docs is None else docs
    _attn_fwd[grid](q, k, v, out, lse, mask, docs, docs if kdocs is None else kdocs, q0, k0, scale * LOG2E, t, h,
                    h // k.shape[1], e, v.shape[-1], *_bht(q), *_bht(k), *_bht(v), *_bht(out), seq_bucket(t),
                    **_meta(q, v, causal, has_mask), HAS_DOCS=docs is not mask)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, mask, causal, has_mask, scale, docs=None, kdocs=None, q0=0, k0=0):
    return _out_like(q, v), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pretrain::flash_attention_bwd", mutates_args=())
def attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  mask: torch.Tensor, dout: torch.Tensor, causal: bool, has_mask: bool, scale: float,
                  one_pass: bool = True, docs: torch.Tensor | None = None, kdocs: torch.Tensor | None = None,
                  q0: int = 0, k0: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``attention_fwd``'s output (``docs``, ``kdocs``, ``q0``, ``k0`` as there)."""
    b, h, t, e = q.shape
    kv_heads, ev = k.shape[1], v.shape[-1]
    meta = _meta(q, v, causal, has_mask)
    meta["HAS_DOCS"] = docs is not None
    requested, one_pass = one_pass, one_pass and one_pass_available(meta["BLOCK_E"], docs is not None,
                                                                     meta["BLOCK_EV"])
    docs = mask if docs is None else docs
    kdocs = docs if kdocs is None else kdocs
    delta = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    rows = 16 if interpreting() else 32
    _attn_bwd_delta_kernel[(triton.cdiv(t, rows), b * h)](out, dout, delta, t, h, ev, *_bht(out), *_bht(dout),
                                                          BLOCK_M=rows, BLOCK_E=meta["BLOCK_EV"], num_warps=4)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    common = (scale * LOG2E, scale, t, h, h // kv_heads, e, ev, *_bht(q), *_bht(k), *_bht(v), *_bht(dout))
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_N"]), b * kv_heads)
    if one_pass:  # dQ summed over the key blocks in fp32 (B, H, T, BLOCK_E) rows, then cast once (torch's calls)
        dq_acc = torch.zeros(b, h, t, meta["BLOCK_E"], dtype=torch.float32, device=q.device)
        _attn_bwd_dkdv[grid](q, k, v, dout, lse, delta, dk, dv, dq_acc, mask, docs, kdocs, q0, k0, *common,
                             *_bht(dk), *_bht(dv), seq_bucket(t), WITH_DQ=True, **meta)
        return dq_acc[..., :e].to(q.dtype, memory_format=torch.contiguous_format), dk, dv
    _attn_bwd_dkdv[grid](q, k, v, dout, lse, delta, dk, dv, delta, mask, docs, kdocs, q0, k0, *common, *_bht(dk),
                         *_bht(dv), seq_bucket(t), WITH_DQ=False, **meta)
    dq = q.new_empty(q.shape) if requested else torch.empty_like(q)  # the layout the fake op promises
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)
    _attn_bwd_dq[grid](q, k, v, dout, lse, delta, dq, mask, docs, kdocs, q0, k0, *common, *_bht(dq), seq_bucket(t),
                       **meta)
    return dq, dk, dv


@attention_bwd.register_fake
def _(q, k, v, out, lse, mask, dout, causal, has_mask, scale, one_pass=True, docs=None, kdocs=None, q0=0, k0=0):
    return q.new_empty(q.shape) if one_pass else torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _pairs(q: torch.Tensor, k: torch.Tensor, causal: bool) -> float:
    """(query, key) pairs the kernels visit: the lower triangle when causal (masked blocks are skipped)."""
    t, s = q.shape[2], k.shape[2]
    return t * (t + 1) / 2 if causal and t == s else t * s


def _fwd_cost(args, kwargs, outputs) -> dict:
    """Forward: QKᵀ and PV, 2 matmuls (2·E + 2·Ev FLOPs a pair and head: 4·E when the value head dim is the
    query/key one); reads q, k, v, writes out and lse."""
    q, k, v, mask, causal = args[:5]
    b, h, _, e = q.shape
    return {"flops": 2.0 * b * h * (e + v.shape[-1]) * _pairs(q, k, causal), "bytes": nbytes(q, k, v, mask, *outputs),
            "launches": 1, "attention": "fwd"}


def _bwd_cost(args, kwargs, outputs) -> dict:
    """Backward. Split, three kernels: delta = rowsum(dO·O); dK/dV recomputes S = QKᵀ and dP = dO·Vᵀ beside dV
    and dK (4 matmuls a pair); dQ recomputes S and dP again beside dQ (3): 7 matmuls, 3.5× the forward's 2. One
    pass: delta, then one kernel with dQ = dS·K as the fifth matmul (2.5×), added atomically into an fp32
    accumulator (counted once: the adds meet in L2); zeroing it and casting it into dQ are torch calls, which the
    meter counts itself. With a value head dim Ev: S, dK and dQ take 2·E FLOPs a pair, dP and dV 2·Ev."""
    q, k, v, out, lse, mask, dout, causal = args[:8]
    one_pass = args[10] if len(args) > 10 else kwargs.get("one_pass", True)
    b, h, t, e = q.shape
    ev = v.shape[-1]
    delta = 4 * b * h * t
    reads = nbytes(q, k, v, dout, lse) + delta  # by each gradient kernel
    if one_pass:
        return {"flops": 2.0 * b * h * (3 * e + 2 * ev) * _pairs(q, k, causal),
                "bytes": nbytes(out, dout) + delta + reads + nbytes(mask, *outputs) + 4 * q.numel(), "launches": 2,
                "attention": "bwd"}
    return {"flops": 2.0 * b * h * (4 * e + 3 * ev) * _pairs(q, k, causal),
            "bytes": nbytes(out, dout) + delta + 2 * reads + nbytes(mask, *outputs), "launches": 3,
            "attention": "bwd"}


# what the step-cost meter (pretrain/plan/step_cost.py) cannot see inside these ops
COSTS = {"pretrain::flash_attention_fwd": _fwd_cost, "pretrain::flash_attention_bwd": _bwd_cost}


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, scale, document_ids=None):
        _check(q, k, v, key_padding_mask, document_ids)
        q, k, v = _rows(q), _rows(k), _rows(v)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        has_mask = key_padding_mask is not None
        mask = key_padding_mask.to(torch.int8).contiguous() if has_mask else q.new_zeros(1, dtype=torch.int8)
        docs = batch_document_bounds(document_ids) if document_ids is not None else None
        out, lse = attention_fwd(q, k, v, mask, bool(causal), has_mask, scale, docs)
        ctx.save_for_backward(q, k, v, out, lse, mask, docs)
        ctx.causal, ctx.scale, ctx.has_mask = bool(causal), scale, has_mask
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask, docs = ctx.saved_tensors
        dq, dk, dv = attention_bwd(q, k, v, out, lse, mask, _rows(dout), ctx.causal, ctx.has_mask, ctx.scale,
                                   backward_kind() == "one_pass", docs)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal: bool = True, key_padding_mask=None, scale=None, dropout_p: float = 0.0,
                    document_ids=None):
    """q (B, H, T, E); k, v (B, K, T, E) with K dividing H, any strides with a unit last one (e.g. transposed
    (B, T, H, E) views); key_padding_mask (B, T) bool, True = keep; document_ids (B, T) integers, equal ids side by
    side forming one document: a token attends only within its document (key blocks wholly in other documents are
    skipped). v may be (B, K, T, Ev) with a value head dim other than q's and k's (MLA). Returns (B, H, T, Ev),
    stored (B, T, H, Ev)."""
    if dropout_p:
        raise ValueError("the Triton attention has no dropout: set model.dropout = 0 or model.kernels = \"torch\"")
    return FlashAttentionFunction.apply(q, k, v, causal, key_padding_mask, scale, document_ids)
