"""SwiGLU, fused: h = silu(g) · u over the gate and up projections (Shazeer 2020), forward and backward one kernel
each. torch runs it as silu and mul forward and as two muls and silu_backward backward — five passes over
F-wide tensors with the intermediate silu(g) written and read again; here the forward reads g and u and writes h,
the backward reads g, u and dh and writes dg and du, recomputing silu(g) in registers. fp32 math, one rounding
of each output. Bytes: forward 3·N·F·itemsize, backward 5·N·F·itemsize. ``swiglu_packed`` takes g and u side by
side in one (N, 2F) tensor (a fused gate/up projection's output) and writes its gradient the same way.
"""

from __future__ import annotations

import torch

from pretrain.kernels._common import check_device, check_dtypes, interpreting, nbytes, require_triton

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _block() -> int:
    return 1024 if interpreting() else 4096


@triton.jit
def _packed(offs, F, PACKED: tl.constexpr):
    """Where element ``offs`` of the (N, F) output sits in g / u: the same offset, or — packed, g and u the two
    halves of one (N, 2F) row — row · 2F + column."""
    if PACKED:
        return (offs // F) * (2 * F) + offs % F
    return offs


@triton.jit
def _swiglu_fwd_kernel(G, U, H, n, F, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    at = _packed(offs, F, PACKED)
    g = tl.load(G + at, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(U + at, mask=inside, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_bwd_kernel(G, U, DH, DG, DU, n, F, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    at = _packed(offs, F, PACKED)
    g = tl.load(G + at, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(U + at, mask=inside, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DU + at, (dh * g * sig).to(DU.dtype.element_ty), mask=inside)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))  # d silu / dg = σ(g)·(1 + g·(1 - σ(g)))
    tl.store(DG + at, dg.to(DG.dtype.element_ty), mask=inside)


@torch.library.custom_op("pretrain::swiglu_fwd", mutates_args=())
def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Registered as a custom op so torch.compile treats the launch as one opaque call."""
    h = torch.empty_like(g)
    n, block = g.numel(), _block()
    _swiglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, h, n, g.shape[-1], BLOCK=block, PACKED=False, num_warps=8)
    return h


@swiglu_fwd.register_fake
def _(g, u):
    return torch.empty_like(g)


@torch.library.custom_op("pretrain::swiglu_bwd", mutates_args=())
def swiglu_bwd(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n, block = g.numel(), _block()
    _swiglu_bwd_kernel[(triton.cdiv(n, block),)](g, u, dh, dg, du, n, g.shape[-1], BLOCK=block, PACKED=False,
                                                 num_warps=8)
    return dg, du


@swiglu_bwd.register_fake
def _(g, u, dh):
    return torch.empty_like(g), torch.empty_like(u)


@torch.library.custom_op("pretrain::swiglu_packed_fwd", mutates_args=())
def swiglu_packed_fwd(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2F): gate and up side by side, as one fused gate/up projection writes them."""
    f = gu.shape[-1] // 2
    h = gu.new_empty(*gu.shape[:-1], f)
    n, block = h.numel(), _block()
    _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gu, gu[..., f:], h, n, f, BLOCK=block, PACKED=True, num_warps=8)
    return h


@swiglu_packed_fwd.register_fake
def _(gu):
    return gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2)


@torch.library.custom_op("pretrain::swiglu_packed_bwd", mutates_args=())
def swiglu_packed_bwd(gu: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """d(gu) (..., 2F) written whole: the one gradient the fused projection's backward reads."""
    f = gu.shape[-1] // 2
    dgu = torch.empty_like(gu)
    n, block = dh.numel(), _block()
    _swiglu_bwd_kernel[(triton.cdiv(n, block),)](gu, gu[..., f:], dh, dgu, dgu[..., f:], n, f, BLOCK=block,
                                                 PACKED=True, num_warps=8)
    return dgu


@swiglu_packed_bwd.register_fake
def _(gu, dh):
    return torch.empty_like(gu)


def _fwd_cost(args, kwargs, output) -> dict:
    return {"bytes": nbytes(*args[:2], output), "launches": 1}


def _bwd_cost(args, kwargs, outputs) -> dict:
    return {"bytes": nbytes(*args[:3], *outputs), "launches": 1}


# what the step-cost meter (pretrain/plan/step_cost.py) cannot see inside these ops
COSTS = {"pretrain::swiglu_fwd": _fwd_cost, "pretrain::swiglu_bwd": _bwd_cost,
         "pretrain::swiglu_packed_fwd": lambda args, kwargs, out: {"bytes": nbytes(args[0], out), "launches": 1},
         "pretrain::swiglu_packed_bwd": lambda args, kwargs, out: {"bytes": nbytes(*args[:2], out), "launches": 1}}


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        check_device(g, u)
        check_dtypes(g, u)
        if g.shape != u.shape or g.dtype != u.dtype:
            raise ValueError(f"swiglu takes gate and up of one shape and dtype, got {tuple(g.shape)} {g.dtype} and "
                             f"{tuple(u.shape)} {u.dtype}")
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return swiglu_bwd(g, u, dh.contiguous())


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) · u, same shape and dtype."""
    return SwiGLUFunction.apply(g, u)


class PackedSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu):
        check_device(gu)
        check_dtypes(gu)
        if gu.shape[-1] % 2:
            raise ValueError(f"swiglu_packed takes gate and up side by side: the last dim must be even, got "
                             f"{tuple(gu.shape)}")
        gu = gu.contiguous()
        ctx.save_for_backward(gu)
        return swiglu_packed_fwd(gu)

    @staticmethod
    def backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        return swiglu_packed_bwd(gu, dh.contiguous())


def swiglu_packed(gu: torch.Tensor) -> torch.Tensor:
    """silu(g) · u of gu = [g, u] along the last dim (a fused gate/up projection's output): (..., F) from
    (..., 2F); its backward writes the (..., 2F) gradient whole, so the fused projection's backward reads one
    tensor — no concatenation of dg and du."""
    return PackedSwiGLUFunction.apply(gu)
