"""Fused AdamW (Loshchilov & Hutter 2019): the whole update of a tensor in one kernel, fp32 math and state.

Per element, with bias corrections c1 = 1 - β1^t, c2 = 1 - β2^t:
    p ← p·(1 - lr·wd);  m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  p ← p - (lr/c1) · m / (sqrt(v)/sqrt(c2) + ε)
exactly ``torch.optim.AdamW``'s arithmetic, in one pass over p, g, m, v (16 bytes read + 12 written per fp32
element, vs several passes unfused). One launch per parameter tensor. Parameters may be fp32, or bf16/fp16
with ``master_weights=True`` keeping an fp32 copy in the state that the update is applied to. The state dict
(``step``, ``exp_avg``, ``exp_avg_sq`` per parameter; group hyper-parameters) loads into and from
``torch.optim.AdamW``.
"""

from __future__ import annotations

import math

import torch

from kernels._common import check_device, require_triton

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BLOCK = 1024


@triton.jit
def _adamw_kernel(P, G, M, V, MASTER, N, lr, beta1, beta2, eps, weight_decay, step_size, inv_sqrt_c2,
                  HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < N
    if HAS_MASTER:
        p = tl.load(MASTER + offsets, mask=inside, other=0.0)
    else:
        p = tl.load(P + offsets, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(G + offsets, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(M + offsets, mask=inside, other=0.0)
    v = tl.load(V + offsets, mask=inside, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)  # lerp, as torch: m·β1 + g·(1-β1)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_c2 + eps)
    tl.store(M + offsets, m, mask=inside)
    tl.store(V + offsets, v, mask=inside)
    if HAS_MASTER:
        tl.store(MASTER + offsets, p, mask=inside)
    tl.store(P + offsets, p.to(P.dtype.element_ty), mask=inside)


class FusedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 master_weights: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
                    "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                    "fused": None, "decoupled_weight_decay": True}
        super().__init__(params, defaults)
        self.master_weights = master_weights

    def _init_state(self, p):
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.master_weights and p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().float().contiguous()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not take sparse gradients")
                check_device(p, p.grad)
                if not p.is_contiguous():
                    raise ValueError(f"FusedAdamW needs contiguous parameters, got strides {p.stride()}")
                if p.dtype != torch.float32 and not self.master_weights:
                    raise TypeError(f"{p.dtype} parameters need master_weights=True (an fp32 copy to update)")
                state = self._init_state(p)
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad.contiguous()
                master = state.get("master_param")
                n = p.numel()
                _adamw_kernel[(triton.cdiv(n, BLOCK),)](
                    p, grad, state["exp_avg"], state["exp_avg_sq"], master if master is not None else p, n, lr,
                    beta1, beta2, eps, wd, lr / (1 - beta1 ** t), 1.0 / math.sqrt(1 - beta2 ** t),
                    HAS_MASTER=master is not None, BLOCK=BLOCK)
        return loss
