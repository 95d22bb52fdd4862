"""Backend choice for the hot ops: ``"torch"`` (the reference: SDPA, fused norms) or ``"triton"`` (``kernels/``).

Layers never call a kernel directly; they hold an ``Ops`` built from ``model.kernels`` so one config key flips
every op — ``"torch"``, ``"triton"`` (all of them), or a comma-separated list of the ops to take from Triton
(``"attention,rms_norm"``) — and tests can compare the two backends on the same weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pretrain.config import KERNEL_OPS, triton_ops  # noqa: F401  (triton_ops: re-exported)

# op name -> (module in kernels/, function name); the names are config.KERNEL_OPS (what model.kernels may list)
TRITON_OPS = {
    "attention": ("pretrain.kernels.attention", "flash_attention"),
    "rms_norm": ("pretrain.kernels.norms", "rms_norm"),
    "layer_norm": ("pretrain.kernels.norms", "layer_norm"),
    "rotary": ("pretrain.kernels.rotary", "rotary"),
    "cross_entropy": ("pretrain.kernels.cross_entropy", "linear_cross_entropy"),
    "swiglu": ("pretrain.kernels.swiglu", "swiglu"),
}
assert tuple(TRITON_OPS) == KERNEL_OPS
# functions that come with an op from the same kernel: the norms with the residual add fused in
COMPANIONS = {"rms_norm": ("add_rms_norm",), "layer_norm": ("add_layer_norm",), "swiglu": ("swiglu_packed",)}


def torch_attention(q, k, v, causal=True, key_padding_mask=None, scale=None, dropout_p=0.0, document_ids=None,
                    branch_ids=None):
    """q (B, H, T, E); k, v (B, K, T, E) with K dividing H; key_padding_mask (B, T) bool, True = keep;
    document_ids (B, T) ints, equal ids side by side forming one document: a token attends only within its own —
    on CUDA through FlexAttention's block mask (blocks of other documents skipped), elsewhere (and with dropout) a
    dense (B, 1, T, T) boolean mask through SDPA, the reference every layout can run. branch_ids (B, T) ints
    (``layers.Documents.branches``): a key of branch b > 0 is seen only by queries of branch b (branch 0 by all)."""
    if document_ids is not None and q.is_cuda and not dropout_p and branch_ids is None:
        return flex_documents(q, k, v, causal, key_padding_mask, document_ids, scale)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, T) broadcast over heads and queries
    if document_ids is not None:
        same = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
        mask = same if mask is None else mask & same
    if branch_ids is not None:
        keys = branch_ids[:, None, None, :]
        seen = (keys == 0) | (keys == branch_ids[:, None, :, None])  # (B, 1, T, T)
        mask = seen if mask is None else mask & seen
    if mask is not None and causal:
        t = q.shape[-2]
        mask = mask & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


_BLOCK_MASKS: list = []  # [(key, block mask)] of the last call: the layers of one forward share one batch's mask
_FLEX: list = []  # the compiled flex_attention, made on first use


def flex_documents(q, k, v, causal, key_padding_mask, document_ids, scale=None, compiled: bool = True):
    """Document-masked attention through FlexAttention: a block mask from the ids (and causality, key padding),
    built once a batch, so key blocks wholly in other documents are never computed. ``compiled``: through
    ``torch.compile`` (FlexAttention's fused kernels; eager runs it unfused, forward only on the CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, _, t, _ = q.shape
    key = (document_ids, document_ids._version, causal, key_padding_mask, t, q.device)
    same = _BLOCK_MASKS and all(a is c if isinstance(a, torch.Tensor) or isinstance(c, torch.Tensor) else a == c
                                for a, c in zip(_BLOCK_MASKS[0][0], key))
    if not same:
        ids, pad = document_ids, key_padding_mask

        def keep(batch, head, qi, ki):
            ok = ids[batch, qi] == ids[batch, ki]
            if causal:
                ok = ok & (ki <= qi)
            if pad is not None:
                ok = ok & pad[batch, ki]
            return ok

        _BLOCK_MASKS[:] = [(key, create_block_mask(keep, b, None, t, t, device=q.device))]
    run = flex_attention
    if compiled:
        if not _FLEX:
            _FLEX.append(torch.compile(flex_attention, dynamic=False))
        run = _FLEX[0]
    return run(q, k, v, block_mask=_BLOCK_MASKS[0][1], scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def torch_rms_norm(x, weight, eps):
    """torch's rms_norm, the weight in the input's dtype: a bf16 activation under autocast meets an fp32 weight,
    which autocast leaves alone (rms_norm is on none of its lists) — and with mismatched dtypes torch's rms_norm
    does not dispatch to its fused CUDA kernel but runs as pow / mean / rsqrt / mul (warning "Mismatch dtype between
    input and weight"). The weight's cast is D elements; fp32 runs are untouched."""
    if weight is not None and weight.dtype != x.dtype and x.dtype in (torch.bfloat16, torch.float16):
        weight = weight.to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def torch_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_add_rms_norm(x, residual, weight, eps):
    s = x + residual
    return s, torch_rms_norm(s, weight, eps)


def torch_add_layer_norm(x, residual, weight, bias, eps):
    s = x + residual
    return s, torch_layer_norm(s, weight, bias, eps)


def torch_rotary(x, cos, sin):
    """x (B, H, T, E), cos / sin (T, E) already in x's dtype: HF's rotate-half RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def torch_swiglu(g, u):
    return F.silu(g) * u


def torch_swiglu_packed(gu):
    """silu(g) · u of gu = [g, u] along the last dim (a fused gate/up projection's output)."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def torch_linear_cross_entropy(hidden, weight, targets, ignore_index=-100):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)


class Ops:
    """The functions layers call, resolved once from ``model.kernels`` ("torch" or "triton")."""

    def __init__(self, backend: str = "torch"):
        self.backend = backend
        self.attention: Callable = torch_attention
        self.rms_norm: Callable = torch_rms_norm
        self.layer_norm: Callable = torch_layer_norm
        self.rotary: Callable = torch_rotary
        self.cross_entropy: Callable = torch_linear_cross_entropy
        self.swiglu: Callable = torch_swiglu
        self.swiglu_packed: Callable = torch_swiglu_packed
        self.add_rms_norm: Callable = torch_add_rms_norm  # (x + r, norm(x + r))
        self.add_layer_norm: Callable = torch_add_layer_norm
        self.triton = triton_ops(backend)
        for name in sorted(self.triton):
            module, function = TRITON_OPS[name]
            setattr(self, name, _load_triton(module, function))
            for companion in COMPANIONS.get(name, ()):
                setattr(self, companion, _load_triton(module, companion))


def _load_triton(module: str, function: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as exc:
        from pretrain.errors import missing_extra

        raise missing_extra(f'model.kernels = "triton" ({module}.{function})', "triton", str(exc)) from None
