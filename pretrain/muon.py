"""Muon (Jordan et al. 2024; at scale: Moonlight, Liu et al. 2025) for the hidden matrices, AdamW for the rest, as
one optimizer (one state dict, one set of param groups for the LR schedule).

Muon, per matrix W (m × n) with gradient G, momentum μ, learning rate η, weight decay λ:

    B ← μ·B + (1 − μ)·G                      (the momentum buffer; torch.optim.Muon's lerp form)
    U = G + μ·(B − G)   (Nesterov) | B      (the update, otherwise)
    O = NS5(U)                               (5 quintic Newton–Schulz steps → ≈ the orthogonal factor of U, in bf16
                                              or fp32, coefficients 3.4445, −4.7750, 2.0315, U / ‖U‖_F first)
    W ← W·(1 − η·λ) − η · 0.2·√max(m, n) · O  (decoupled decay; 0.2·√max(m, n) matches AdamW's update RMS)

Stacked expert weights (E, ·, ·) are E matrices, each orthogonalised on its own.

Distributed, exact: Newton–Schulz needs the whole matrix. Each DTensor parameter's momentum is updated on its
shard (elementwise, as one process would), then the update U is gathered whole over every mesh it is sharded on
(FSDP's dp, TP's tp), every rank runs the same NS5 on the same matrix and keeps its own shard of O. Any layout so
applies the one-process update to the gradients it has (torch.optim.Muon on FSDP / TP shards instead
orthogonalises with a collective inside every iteration). Gradients reduced in another order differ by ~1e-7;
in bf16 NS5 that flips roundings (3e-5 apart after 3 steps in the layout tests), in fp32 (``optim.muon_ns_dtype``)
the layouts agree to 1e-7. The redundant NS5 costs compute on every rank; giving each matrix one owner rank
(round-robin) and scattering its result is the next step.

AdamW (decoupled weight decay, bias-corrected) takes embeddings, the output head, norms, biases and MoE routers.
"""

from __future__ import annotations

import math

import torch

from pretrain.distributed import local_part, whole

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(u: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=torch.bfloat16) -> torch.Tensor:
    """≈ the orthogonal factor of ``u`` (m, n), or of each matrix of a stack (E, m, n), in ``dtype`` (bf16:
    torch.optim.Muon's iteration op for op, so a 2-D result equals it bit for bit), batched for stacks."""
    a, b, c = NS_COEFFICIENTS
    x = u.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    if x.ndim == 2:
        x = x.div(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        x = x.div(x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def rms_scale(shape: torch.Size) -> float:
    """Moonlight's 0.2·√max(m, n): the orthogonalised update scaled to AdamW's typical RMS."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def _shard_of(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` laid out as the DTensor ``like`` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry ``muon: bool``. Muon groups use ``momentum``, ``nesterov``, ``ns_steps`` and
    ``lr_scale`` (their LR = the schedule's × lr_scale); AdamW groups ``betas`` and ``eps``."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, nesterov=True,
                 ns_steps=5, lr_scale=1.0, ns_dtype: str = "bf16"):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        lr_scale=lr_scale, weight_decay=0.0, muon=False)
        self.ns_dtype = torch.bfloat16 if ns_dtype == "bf16" else torch.float32
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, mu, decay = group["lr"] * group["lr_scale"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            # every rank: the same whole matrix
            ortho = newton_schulz(whole(update).float(), group["ns_steps"], dtype=self.ns_dtype)
            local = local_part(p)
            local.mul_(1 - lr * decay)
            local.add_(_shard_of(ortho.to(local.dtype), p), alpha=-lr * rms_scale(p.shape))

    def _adamw(self, group: dict) -> None:
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.mul_(1 - lr * decay)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


def muon_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Muon: every matrix inside the blocks (attention and MLP projections, experts, shared experts); AdamW: the
    rest — embeddings, output / MLM heads, norms, biases, MoE routers — decayed like ``param_groups`` decays."""
    from pretrain.models.moe import Router

    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters(recurse=False)}
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    muon, decay, other = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_blocks = name.startswith("layers.") or ".layers." in name
        if in_blocks and p.ndim >= 2 and id(p) not in routers:
            muon.append(p)
        elif p.ndim >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            other.append(p)
    return [{"params": muon, "weight_decay": weight_decay, "muon": True},
            {"params": decay, "weight_decay": weight_decay, "muon": False},
            {"params": other, "weight_decay": 0.0, "muon": False}]
