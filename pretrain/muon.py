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
shard (elementwise, as one process would). Then the updates U of the parameters sharded alike (same shape, mesh
and placements: FSDP's dp, TP's tp, EP's experts, or several) are taken G at a time (G = the ranks of their mesh,
the last batch padded with zeros) and stacked; one redistribution hands every rank one whole matrix (round-robin
ownership: matrix k of a batch to rank k), the owner runs NS5 on it, and the reverse redistribution sends each
rank its own shard of every result. Any layout so applies the one-process update to the gradients it has, each
NS5 runs once per mesh, and the traffic is an all-to-all of U and of O (torch.optim.Muon on FSDP / TP shards
instead orthogonalises with a collective inside every iteration). Parameters replicated across ranks (one
process, DDP, ZeRO-1's replicated weights) have their whole gradient on every rank and orthogonalise locally.
Gradients reduced in another order differ by ~1e-7; in bf16 NS5 that flips roundings (3e-5 apart after 3 steps
in the layout tests), in fp32 (``optim.muon_ns_dtype``) the layouts agree to 1e-7.

AdamW (decoupled weight decay, bias-corrected) takes embeddings, the output head, norms, biases and MoE routers.
"""

from __future__ import annotations

import math

import torch

from pretrain.distributed import local_part

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


def _shifted(placement):
    """The placement of a parameter's shard within a stack of such parameters (new leading dim)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, _StridedShard):  # FSDP over TP-sharded dim: not a Shard subclass in every torch
        return _StridedShard(placement.dim + 1, split_factor=placement.split_factor)
    if isinstance(placement, Shard):
        return Shard(placement.dim + 1)
    return placement  # Replicate (HSDP's replicate dim); a Partial is never a parameter's


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry ``muon: bool``. Muon groups use ``momentum``, ``nesterov``, ``ns_steps`` and
    ``lr_scale`` (their LR = the schedule's × lr_scale); AdamW groups ``betas`` and ``eps``."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, nesterov=True,
                 ns_steps=5, lr_scale=1.0, ns_dtype: str = "bf16"):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        lr_scale=lr_scale, weight_decay=0.0, muon=False)
        self.ns_dtype = torch.bfloat16 if ns_dtype == "bf16" else torch.float32
        self.ns_calls = 0  # Newton–Schulz runs on this rank (a stack of experts counts once)
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
        params, updates = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            params.append(p)
            updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)
        for p, ortho in zip(params, self._orthogonalise(updates, group["ns_steps"])):
            local = local_part(p)
            local.mul_(1 - lr * decay)
            local.add_(ortho.to(local.dtype), alpha=-lr * rms_scale(p.shape))

    def _orthogonalise(self, updates: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """NS5 of every update, as this rank's part of each result: replicated ones here, sharded ones on one owner
        rank per matrix (see the module's docstring)."""
        from torch.distributed.tensor import DTensor, Shard

        out: list = [None] * len(updates)
        alike: dict = {}
        for i, u in enumerate(updates):
            if isinstance(u, DTensor) and u.device_mesh.size() > 1:
                alike.setdefault((tuple(u.shape), u.device_mesh, tuple(u.placements)), []).append(i)
            else:
                out[i] = newton_schulz(local_part(u).float(), steps, dtype=self.ns_dtype)
                self.ns_calls += 1
        for (shape, mesh, placements), members in alike.items():
            size = mesh.size()
            stacked = tuple(_shifted(pl) for pl in placements)
            owned = (Shard(0),) * mesh.ndim  # the stack's matrices dealt out over all mesh dims: one per rank
            for start in range(0, len(members), size):
                batch = [updates[i] for i in members[start:start + size]]
                batch += [torch.zeros_like(batch[0])] * (size - len(batch))
                mine = torch.stack(batch).redistribute(mesh, owned).to_local()  # (1, *shape): one whole matrix
                ortho = newton_schulz(mine[0].float(), steps, dtype=self.ns_dtype).unsqueeze(0)  # as one process
                self.ns_calls += 1
                back = DTensor.from_local(ortho, mesh, owned, shape=torch.Size((size, *shape)),
                                          stride=_contiguous_stride((size, *shape))).redistribute(mesh, stacked)
                local = back.to_local()
                for k, i in enumerate(members[start:start + size]):
                    out[i] = local[k]
        return out

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
