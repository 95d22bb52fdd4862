"""Fused linear + cross-entropy over vocabulary chunks: the (tokens, vocab) logits never exist whole.

Matmuls run in the inputs' dtype (bf16 / fp16 tensor cores, fp32 accumulation inside each GEMM); no fp32 copy
of the head weight is made. Two passes over vocabulary chunks W_j of C rows:
  1. logits_j = h · W_jᵀ (N × C); one Triton program per row folds the chunk into running fp32 statistics:
     max m, Σ exp (online softmax), the target's logit and Σ x (for label smoothing).
  2. logits_j again, turned in place into their gradient by one program per row, then
     dW_j = dlogits_jᵀ · h (one GEMM over every token: accumulated in fp32 by the GEMM, cast once, written once)
     and dh += dlogits_j · W_j (accumulated in fp32 across chunks).
The gradients are computed during the forward (the loss is a scalar) and scaled by the incoming gradient in
backward (Liger-Kernel's scheme). Chunking the vocabulary rather than the tokens lets every dW row be written
once, instead of re-reading an fp32 (V, D) accumulator per token chunk, at the cost of recomputing the logits:
8·N·D·V FLOPs instead of 6. Peak extra memory: one N × C chunk plus the (N, D) fp32 accumulator.

Per row with lse = log Σ exp(x), target t, smoothing ε, z-loss weight z:
    loss = (1-ε)·(lse - x_t) + ε·(lse - mean(x)) + z·lse²
    dx   = softmax(x)·(1 + 2z·lse) - (1-ε)·onehot(t) - ε/V
then divided by the number of non-ignored targets (the mean). Ignored rows contribute nothing.
"""

from __future__ import annotations

import torch

from pretrain.kernels._common import (
    check_device,
    check_dtypes,
    interpreting,
    nbytes,
    next_power_of_2,
    require_triton,
)

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _block(c: int) -> tuple[int, int]:
    """(columns a program handles per step, warps): 8 elements a thread, 4–16 warps."""
    block = min(4096, next_power_of_2(c)) if not interpreting() else min(1024, next_power_of_2(c))
    return block, max(4, min(16, block // 256))


@triton.jit
def _ce_stats_kernel(LOGITS, TARGETS, MAX, SUMEXP, TARGET_LOGIT, TOTAL, stride, v_start, C,
                     BLOCK: tl.constexpr):
    """Fold columns [v_start, v_start + C) of one row into its running max / Σ exp / target logit / Σ x."""
    row = tl.program_id(0)
    base = LOGITS + row * stride
    m = tl.load(MAX + row)
    s = tl.load(SUMEXP + row)
    total = tl.load(TOTAL + row)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < C, other=-float("inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
        total += tl.sum(tl.where(cols < C, x, 0.0), axis=0)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(TOTAL + row, total)
    target = tl.load(TARGETS + row) - v_start
    if (target >= 0) & (target < C):
        tl.store(TARGET_LOGIT + row, tl.load(base + target).to(tl.float32))


@triton.jit
def _ce_grad_kernel(LOGITS, TARGETS, LSE, stride, v_start, C, V, ignore_index, INV_COUNT, smoothing, z_loss,
                    BLOCK: tl.constexpr):
    """Overwrite one row's logits chunk with d loss / d logits (zero for an ignored target). ``INV_COUNT`` points
    at 1 / (kept targets): read on the device, so the host never waits for the count."""
    row = tl.program_id(0)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    keep = target != ignore_index
    scale = tl.where(keep, tl.load(INV_COUNT), 0.0)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < C, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) * (1.0 + 2.0 * z_loss * lse) - smoothing / V
        grad = tl.where(cols + v_start == target, grad - (1.0 - smoothing), grad)
        tl.store(base + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=cols < C)


def vocab_chunk(n: int, d: int, v: int) -> int:
    """Vocabulary rows per chunk: the logits chunk about the size of the hidden states, a power of 2 (≥ 1024)."""
    return min(v, max(1024, next_power_of_2(max(1, d))))


def forward_and_gradients(hidden, weight, targets, ignore_index: int, z_loss: float, label_smoothing: float):
    """(loss, d loss / d hidden, d loss / d weight), the gradients in the inputs' dtypes."""
    n, d = hidden.shape
    v = weight.shape[0]
    keep = targets != ignore_index
    # a target outside the vocabulary would read another row's logit and give a finite, wrong loss: refuse it, as
    # torch and Liger do, with an assert that does not wait for the GPU (on CPU it raises at once)
    torch._assert_async(~(keep & ((targets < 0) | (targets >= v))).any(),
                        f"linear_cross_entropy: a target is outside the vocabulary [0, {v}) (and not ignore_index)")
    inv_count = 1.0 / keep.sum().clamp(min=1).to(torch.float32)  # a device scalar: no host sync
    f32 = {"dtype": torch.float32, "device": hidden.device}
    row_max = torch.full((n,), -float("inf"), **f32)
    sumexp, total, target_logit = torch.zeros(n, **f32), torch.zeros(n, **f32), torch.zeros(n, **f32)
    c = vocab_chunk(n, d, v)
    block, warps = _block(c)
    for start in range(0, v, c):  # pass 1: statistics
        logits = hidden @ weight[start:start + c].t()  # (N, C) in the inputs' dtype
        _ce_stats_kernel[(n,)](logits, targets, row_max, sumexp, target_logit, total, logits.stride(0), start,
                               logits.shape[1], BLOCK=block, num_warps=warps)
    lse = row_max + sumexp.log()
    losses = ((1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - total / v)
              + z_loss * lse * lse)
    loss = torch.where(keep, losses, 0.0).sum() * inv_count
    grad_hidden = torch.zeros(n, d, **f32)
    grad_weight = torch.empty_like(weight)
    for start in range(0, v, c):  # pass 2: gradients
        w = weight[start:start + c]
        logits = hidden @ w.t()
        _ce_grad_kernel[(n,)](logits, targets, lse, logits.stride(0), start, logits.shape[1], v, ignore_index,
                              inv_count, label_smoothing, z_loss, BLOCK=block, num_warps=warps)
        torch.mm(logits.t(), hidden, out=grad_weight[start:start + c])
        grad_hidden += logits @ w
    return loss, grad_hidden.to(hidden.dtype), grad_weight


@torch.library.custom_op("pretrain::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             z_loss: float, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_and_gradients` as a custom op: torch.compile treats it as one opaque call."""
    return forward_and_gradients(hidden, weight, targets, ignore_index, z_loss, label_smoothing)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, ignore_index, z_loss, label_smoothing):
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight)


def _cost(args, kwargs, outputs) -> dict:
    """The Triton kernels only (the chunk matmuls, zeros and the count are torch calls the meter sees): per
    vocabulary chunk, the statistics kernel reads the logits chunk and the gradient kernel rewrites it."""
    hidden, weight, targets = args[:3]
    n, d = hidden.shape
    v = weight.shape[0]
    chunks = triton.cdiv(v, vocab_chunk(n, d, v))
    logits = n * v * hidden.element_size()
    rows = n * 4 * 4 * chunks  # per-row statistics (max, sum of exp, target logit, total) read + written
    return {"bytes": 3 * logits + 2 * rows + 2 * chunks * nbytes(targets), "launches": 2 * chunks}


# what the step-cost meter (pretrain/plan/step_cost.py) cannot see inside this op
COSTS = {"pretrain::linear_cross_entropy_fwd": _cost}


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, label_smoothing):
        check_device(hidden, weight, targets)
        check_dtypes(hidden, weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if torch.is_autocast_enabled(hidden.device.type):  # as F.linear would: the matmuls in the autocast dtype
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"linear_cross_entropy takes hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} "
                             f"and {tuple(weight.shape)}")
        if hidden.dtype != weight.dtype:
            raise TypeError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; the "
                            "matmuls run in one dtype (cast one of them, or run under autocast)")
        if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be integer (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)} "
                             f"{targets.dtype}")
        loss, grad_hidden, grad_weight = linear_cross_entropy_fwd(hidden.contiguous(), weight.contiguous(),
                                                                  targets.contiguous(), ignore_index, z_loss,
                                                                  label_smoothing)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return ((grad_hidden * grad_loss.to(grad_hidden.dtype)).to(ctx.dtypes[0]),
                (grad_weight * grad_loss.to(grad_weight.dtype)).to(ctx.dtypes[1]), None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` over the non-ignored ones."""
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, z_loss, label_smoothing)
