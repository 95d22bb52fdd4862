"""SwiGLU, fused: h = silu(g) · u over the gate and up projections (Shazeer 2020), forward and backward one kernel
each. torch runs it as silu and mul forward and as two muls and silu_backward backward — five passes over
F-wide tensors with the intermediate silu(g) written and read again; here the forward reads g and u and writes h,
the backward reads g, u and dh and writes dg and du, recomputing silu(g) in registers. fp32 math, one rounding
of each output. Bytes: forward 3·N·F·itemsize, backward 5·N·F·itemsize.
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
def _swiglu_fwd_kernel(G, U, H, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(G + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=inside, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_bwd_kernel(G, U, DH, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(G + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=inside, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DU + offs, (dh * g * sig).to(DU.dtype.element_ty), mask=inside)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))  # d silu / dg = σ(g)·(1 + g·(1 - σ(g)))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=inside)


@torch.library.custom_op("pretrain::swiglu_fwd", mutates_args=())
def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Registered as a custom op so torch.compile treats the launch as one opaque call."""
    h = torch.empty_like(g)
    n, block = g.numel(), _block()
    _swiglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, h, n, BLOCK=block, num_warps=8)
    return h


@swiglu_fwd.register_fake
def _(g, u):
    return torch.empty_like(g)


@torch.library.custom_op("pretrain::swiglu_bwd", mutates_args=())
def swiglu_bwd(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n, block = g.numel(), _block()
    _swiglu_bwd_kernel[(triton.cdiv(n, block),)](g, u, dh, dg, du, n, BLOCK=block, num_warps=8)
    return dg, du


@swiglu_bwd.register_fake
def _(g, u, dh):
    return torch.empty_like(g), torch.empty_like(u)


def _fwd_cost(args, kwargs, output) -> dict:
    return {"bytes": nbytes(*args[:2], output), "launches": 1}


def _bwd_cost(args, kwargs, outputs) -> dict:
    return {"bytes": nbytes(*args[:3], *outputs), "launches": 1}


# what the step-cost meter (pretrain/plan/step_cost.py) cannot see inside these ops
COSTS = {"pretrain::swiglu_fwd": _fwd_cost, "pretrain::swiglu_bwd": _bwd_cost}


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
