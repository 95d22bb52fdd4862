"""Fused linear + cross-entropy over token chunks: the (tokens, vocab) logits never exist whole.

For each chunk of C tokens: logits = h_c · Wᵀ (a matmul, fp32), then one Triton program per row makes two passes
over the vocab — an online max / sum-exp for the log-sum-exp, then the loss and, in place of the logits, their
gradient — and the chunk's gradients are folded in: dh_c = dlogits · W, dW += dlogitsᵀ · h_c. The gradients are
computed during the forward (the loss is a scalar) and scaled by the incoming gradient in backward (Liger-Kernel's
scheme). Peak extra memory is C × V fp32 instead of N × V.

Per row with lse = log Σ exp(x), target t, smoothing ε, z-loss weight z:
    loss = (1-ε)·(lse - x_t) + ε·(lse - mean(x)) + z·lse²
    dx   = softmax(x)·(1 + 2z·lse) - (1-ε)·onehot(t) - ε/V
then divided by the number of non-ignored targets (the mean). Ignored rows contribute nothing.
FLOPs ≈ 6·N·D·V (three matmuls); bytes ≈ the logits chunk written and read twice per chunk.
"""

from __future__ import annotations

import torch

from kernels._common import check_device, check_dtypes, next_power_of_2, require_triton

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BLOCK_V = 1024


@triton.jit
def _ce_row_kernel(LOGITS, TARGETS, LOSS, stride, V, ignore_index, inv_count, smoothing, z_loss,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(base + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        m = -float("inf")
        s = 0.0
        total = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
            total += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
        lse = m + tl.log(s)
        x_t = tl.load(base + target).to(tl.float32)
        loss = (1.0 - smoothing) * (lse - x_t) + smoothing * (lse - total / V) + z_loss * lse * lse
        tl.store(LOSS + row, loss * inv_count)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * (1.0 + 2.0 * z_loss * lse) - smoothing / V
            grad = tl.where(cols == target, grad - (1.0 - smoothing), grad)
            tl.store(base + cols, grad * inv_count, mask=cols < V)


def chunk_size(n: int, d: int, v: int) -> int:
    """Tokens per chunk: the logits chunk about the size of the hidden states (Liger's rule), a power of 2."""
    return max(1, min(next_power_of_2(n), next_power_of_2(-(-n // max(1, -(-v // d))))))


@torch.library.custom_op("pretrain::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             z_loss: float, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d hidden, d loss / d weight), chunk by chunk; a custom op for torch.compile."""
    n, d = hidden.shape
    v = weight.shape[0]
    count = int((targets != ignore_index).sum())
    inv_count = 1.0 / max(count, 1)
    grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    weight32 = weight.float()
    c = chunk_size(n, d, v)
    for start in range(0, n, c):
        h = hidden[start:start + c].float()
        logits = h @ weight32.t()  # (C, V), becomes dlogits in place
        _ce_row_kernel[(logits.shape[0],)](logits, targets[start:start + c].contiguous(), losses[start:start + c],
                                           logits.stride(0), v, ignore_index, inv_count, label_smoothing, z_loss,
                                           BLOCK=min(BLOCK_V, next_power_of_2(v)))
        grad_hidden[start:start + c] = logits @ weight32
        grad_weight.addmm_(logits.t(), h)
    return losses.sum(), grad_hidden, grad_weight


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, ignore_index, z_loss, label_smoothing):
    return (hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden, dtype=torch.float32),
            torch.empty_like(weight, dtype=torch.float32))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, label_smoothing):
        check_device(hidden, weight, targets)
        check_dtypes(hidden, weight)
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"linear_cross_entropy takes hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} "
                             f"and {tuple(weight.shape)}")
        if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be integer (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)} "
                             f"{targets.dtype}")
        loss, grad_hidden, grad_weight = linear_cross_entropy_fwd(hidden.contiguous(), weight.contiguous(), targets,
                                                                  ignore_index, z_loss, label_smoothing)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return ((grad_hidden * grad_loss).to(ctx.dtypes[0]), (grad_weight * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` over the non-ignored ones."""
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, z_loss, label_smoothing)
