"""RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016), forward and backward.

Launch shape from the row width D (``launch_shape``): warps grow with the block (4 up to 2048 columns, 8 from
4096, 16 from 8192: about 16 elements a thread); rows narrower than 2048 columns are taken several to a program
in the forward (a (ROWS, BLOCK) tile), so small models still fill the GPU with large enough programs.

Forward: y = (x - μ) · rstd · w (+ b), rstd = 1 / sqrt(mean((x - μ)²) + eps), μ = 0 for RMSNorm; μ and rstd are
saved (8 bytes a row). Backward with x̂ = (x - μ) · rstd and g = dy · w:
    dx = rstd · (g - mean(g) - x̂ · mean(g · x̂))      (LayerNorm; RMSNorm drops the mean(g) term)
and dw = Σ_rows dy · x̂, db = Σ_rows dy, reduced as per-program partial sums (deterministic) then summed.
Math is fp32 whatever the input dtype. Bytes: read x, w (+ b), write y: ≈ 2·N·D·itemsize forward,
≈ 3·N·D·itemsize backward.

Residual add fused in (``add_rms_norm`` / ``add_layer_norm``, a pre-norm block's ``s = x + r; y = norm(s)``): the
forward reads x and r, writes s (rounded to its dtype, then normalised: the unfused ops' numbers) and y — one pass
instead of an add (3 passes) and a norm (2); the backward adds the gradient s receives from the residual path
(ds) to the norm's own: dx = dr = ds + norm_bwd(dy), one pass instead of a norm backward (3) and an add (3).
"""

from __future__ import annotations

import torch

from pretrain.kernels._common import check_device, check_dtypes, nbytes, next_power_of_2, require_triton

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MAX_DIM = 65536
ROWS_PER_PROGRAM = 16  # backward: rows whose weight-gradient contributions one program sums


def launch_shape(d: int) -> tuple[int, int, int]:
    """(BLOCK columns, warps, forward rows a program) for rows of width d."""
    block = next_power_of_2(d)
    warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    return block, warps, max(1, min(16, 2048 // block))


@triton.jit
def _norm_fwd_kernel(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, N, D, eps,
                     HAS_BIAS: tl.constexpr, RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # s = x + r, stored, and normalised as stored (rounded to S's dtype)
        x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        x = x.to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=inside)
        x = x.to(tl.float32)
    if RMS:
        mean = tl.zeros([ROWS], dtype=tl.float32)
    else:
        mean = tl.sum(x, axis=1) / D
    centered = tl.where(inside, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + rows, mean, mask=rows < N)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def _norm_bwd_kernel(X, W, DY, DRES, DX, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, stride_x, stride_dy, stride_dres,
                     stride_dx, N, D, RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRES: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < N:
            x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(inside, (x - mean) * rstd, 0.0)
            g = dy * w
            c2 = tl.sum(g * xhat, axis=0) / D
            if RMS:
                dx = (g - xhat * c2) * rstd
            else:
                c1 = tl.sum(g, axis=0) / D
                dx = (g - c1 - xhat * c2) * rstd
            if HAS_DRES:  # the residual path's gradient of s, summed in fp32 before the one rounding
                dx += tl.load(DRES + row * stride_dres + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)
            dw += dy * xhat
            db += dy
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=inside)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * D + cols, db, mask=inside)


def _check(x, weight, bias):
    check_device(*(t for t in (x, weight, bias) if t is not None))
    check_dtypes(*(t for t in (x, weight, bias) if t is not None))
    d = x.shape[-1]
    if weight.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"norm weight / bias must have shape ({d},), got {tuple(weight.shape)}"
                         + ("" if bias is None else f" / {tuple(bias.shape)}"))
    if d > MAX_DIM:
        raise ValueError(f"norm dim {d} exceeds the supported maximum {MAX_DIM}")


# The launches are registered as custom ops so torch.compile treats them as opaque calls.
@torch.library.custom_op("pretrain::norm_fwd", mutates_args=())
def norm_fwd(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
             eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, s, mean, rstd): s = x2 + residual when one is given (normalised in its place), else empty."""
    n, d = x2.shape
    if residual is not None:
        s = torch.empty(n, d, dtype=torch.promote_types(x2.dtype, residual.dtype), device=x2.device)
        y = torch.empty_like(s)
    else:
        s, y = x2.new_empty(0), torch.empty_like(x2)
    mean = torch.empty(n, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x2.device)
    block, warps, rows = launch_shape(d)
    r = residual if residual is not None else x2
    _norm_fwd_kernel[(triton.cdiv(n, rows),)](
        x2, r, s if residual is not None else y, weight, bias if bias is not None else weight, y, mean, rstd,
        x2.stride(0), r.stride(0), d, y.stride(0), n, d, eps, HAS_BIAS=bias is not None, RMS=rms,
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block, num_warps=warps)
    return y, s, mean, rstd


@norm_fwd.register_fake
def _(x2, weight, bias, residual, eps, rms):
    n, d = x2.shape
    dtype = x2.dtype if residual is None else torch.promote_types(x2.dtype, residual.dtype)
    s = x2.new_empty(0) if residual is None else x2.new_empty(n, d, dtype=dtype)
    return x2.new_empty(n, d, dtype=dtype), s, x2.new_empty(n, dtype=torch.float32), \
        x2.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("pretrain::norm_bwd", mutates_args=())
def norm_bwd(x2: torch.Tensor, weight: torch.Tensor, dy2: torch.Tensor, dres: torch.Tensor | None, mean: torch.Tensor,
             rstd: torch.Tensor, rms: bool, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx + dres, dw, db): ``dres`` the gradient x2 gets besides through the norm (None: none)."""
    n, d = x2.shape
    dx = torch.empty_like(x2)
    programs = triton.cdiv(n, ROWS_PER_PROGRAM)
    dw_partial = torch.empty(programs, d, dtype=torch.float32, device=x2.device)
    db_partial = torch.zeros(programs, d, dtype=torch.float32, device=x2.device)
    _norm_bwd_kernel[(programs,)](x2, weight, dy2, dres if dres is not None else dy2, dx, mean, rstd, dw_partial,
                                  db_partial, x2.stride(0), dy2.stride(0),
                                  dres.stride(0) if dres is not None else 0, dx.stride(0), n, d, RMS=rms,
                                  HAS_BIAS=has_bias, HAS_DRES=dres is not None, ROWS=ROWS_PER_PROGRAM,
                                  BLOCK=launch_shape(d)[0], num_warps=launch_shape(d)[1])
    return dx, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


@norm_bwd.register_fake
def _(x2, weight, dy2, dres, mean, rstd, rms, has_bias):
    return torch.empty_like(x2), torch.empty_like(weight), torch.empty_like(weight)


def _fwd_cost(args, kwargs, outputs) -> dict:
    x2, weight, bias, residual = args[:4]
    return {"bytes": nbytes(x2, weight, bias, residual, *outputs), "launches": 1}


def _bwd_cost(args, kwargs, outputs) -> dict:
    """The kernel: reads x, w, dy, μ, rstd; writes dx and the per-program weight (and bias) partial sums (their
    sums over programs are torch ops the meter sees)."""
    x2, weight, dy2, dres, mean, rstd, rms, has_bias = args[:8]
    n, d = x2.shape
    partials = triton.cdiv(n, ROWS_PER_PROGRAM) * d * 4 * (2 if has_bias else 1)
    return {"bytes": nbytes(x2, weight, dy2, dres, mean, rstd, outputs[0]) + partials, "launches": 1}


# what the step-cost meter (pretrain/plan/step_cost.py) cannot see inside these ops
COSTS = {"pretrain::norm_fwd": _fwd_cost, "pretrain::norm_bwd": _bwd_cost}


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        _check(x, weight, bias)
        x2 = _rows(x)
        y, _, mean, rstd = norm_fwd(x2, weight, bias, None, eps, rms)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.rms, ctx.shape = bias is not None, rms, x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = norm_bwd(x2, weight, _rows(dy), None, mean, rstd, ctx.rms, ctx.has_bias)
        return dx.reshape(ctx.shape), dw, db if ctx.has_bias else None, None, None


class AddNormFunction(torch.autograd.Function):
    """(x, r) -> (s = x + r, norm(s)): both outputs from one kernel, both gradients (equal) from one."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms):
        _check(x, weight, bias)
        check_device(x, residual)
        check_dtypes(residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual add: shapes {tuple(x.shape)} and {tuple(residual.shape)} differ")
        y, s, mean, rstd = norm_fwd(_rows(x), weight, bias, _rows(residual), eps, rms)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_bias, ctx.rms, ctx.shape = bias is not None, rms, x.shape
        ctx.dtypes = x.dtype, residual.dtype
        return s.reshape(x.shape), y.reshape(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used
            dx, dw, db = ds, None, None
        else:
            dx, dw, db = norm_bwd(s, weight, _rows(dy), None if ds is None else _rows(ds), mean, rstd, ctx.rms,
                                  ctx.has_bias)
            dx = dx.reshape(ctx.shape)
        return dx.to(ctx.dtypes[0]), dx.to(ctx.dtypes[1]), dw, db if ctx.has_bias else None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return NormFunction.apply(x, weight, None, eps, True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return NormFunction.apply(x, weight, bias, eps, False)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)) in one pass (the sum in torch's promoted dtype, as ``x + r``)."""
    return AddNormFunction.apply(x, residual, weight, None, eps, True)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, layer_norm(x + residual)) in one pass."""
    return AddNormFunction.apply(x, residual, weight, bias, eps, False)
