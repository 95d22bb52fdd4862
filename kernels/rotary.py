"""Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half convention of HF Llama, fwd + bwd.

For x = [x1, x2] (halves of the head dim) and tables cos = [c1, c2], sin = [s1, s2] (equal halves for RoPE's
cat(θ, θ)): y1 = x1·c1 - x2·s1, y2 = x2·c2 + x1·s2; the backward applies the transpose (the rotation by -θ). One program per (batch, head) and
block of ROWS tokens; fp32 math. The tables are (T, E), shared by the batch, or (B, 1, T, E): one a row, for
positions that restart at each packed document. x may be any (B, H, T, E) view with a unit last stride (the model's transposed
(B, T, H, E) projections), and y keeps x's layout, so neither the rotation nor the attention after it copies.
Bytes: read x and the (T, E) tables, write y: ≈ 2·B·H·T·E·itemsize.
"""

from __future__ import annotations

import torch

from pretrain.kernels._common import check_device, check_dtypes, nbytes, next_power_of_2, require_triton

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ROWS = 16  # tokens a program rotates


@triton.jit(do_not_specialize=["H"])
def _rotary_kernel(X, COS, SIN, Y, T, H, HALF, stride_xb, stride_xh, stride_xt, stride_yb, stride_yh, stride_yt,
                   stride_cb, BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    ts = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, BLOCK)
    inside = (ts[:, None] < T) & (cols[None, :] < HALF)
    x_row = X + b * stride_xb + h * stride_xh + ts[:, None] * stride_xt
    y_row = Y + b * stride_yb + h * stride_yh + ts[:, None] * stride_yt
    table = b * stride_cb + ts[:, None] * 2 * HALF  # stride_cb: 0 for one table shared by the batch
    x1 = tl.load(x_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    cos1 = tl.load(COS + table + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + table + HALF + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + table + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + table + HALF + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the forward map
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(y_row + cols[None, :], y1.to(Y.dtype.element_ty), mask=inside)
    tl.store(y_row + HALF + cols[None, :], y2.to(Y.dtype.element_ty), mask=inside)


def _strided(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("pretrain::rotary", mutates_args=())
def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Registered as a custom op so torch.compile treats the launch as one opaque call."""
    b, h, t, e = x.shape
    y = torch.empty_like(x)  # x's layout (a transposed view stays one)
    _rotary_kernel[(triton.cdiv(t, ROWS), b * h)](x, cos, sin, y, t, h, e // 2, x.stride(0), x.stride(1),
                                                  x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                                                  cos.stride(0) if cos.dim() == 4 else 0,
                                                  BACKWARD=backward, ROWS=ROWS, BLOCK=next_power_of_2(e // 2))
    return y


@_launch.register_fake
def _(x, cos, sin, backward):
    return torch.empty_like(x)


def _cost(args, kwargs, output) -> dict:
    x, cos, sin = args[:3]
    return {"bytes": nbytes(x, cos, sin, output), "launches": 1}


# what the step-cost meter (pretrain/plan/step_cost.py) cannot see inside this op
COSTS = {"pretrain::rotary": _cost}


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        check_device(x, cos, sin)
        check_dtypes(x, cos, sin)
        if x.dim() != 4 or x.shape[-1] % 2:
            raise ValueError(f"rotary takes x (B, H, T, E) with an even E, got {tuple(x.shape)}")
        b, t, e = x.shape[0], x.shape[2], x.shape[3]
        if cos.dim() == 4:  # one table a row
            if cos.shape != (b, 1, t, e) or sin.shape != cos.shape:
                raise ValueError(f"per-row rotary tables must be ({b}, 1, {t}, {e}), got cos {tuple(cos.shape)}, "
                                 f"sin {tuple(sin.shape)}")
            cos, sin = cos.contiguous(), sin.contiguous()
        else:
            if cos.shape[-1] != e or sin.shape != cos.shape or cos.shape[0] < t:
                raise ValueError(f"rotary tables must be (>= {t}, {e}), got cos {tuple(cos.shape)}, "
                                 f"sin {tuple(sin.shape)}")
            cos, sin = cos[:t].contiguous(), sin[:t].contiguous()
        ctx.save_for_backward(cos, sin)
        return _launch(_strided(x), cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(_strided(dy), cos, sin, True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, E); cos, sin (>= T, E), or (B, 1, T, E) per row -> x rotated, same shape and dtype."""
    return RotaryFunction.apply(x, cos, sin)
