"""Mixture-of-Experts feed-forward (Shazeer et al. 2017; Switch, Fedus et al. 2021; DeepSeek-V3, 2024), dropless.

Shapes: N tokens (B·T flattened), D model dim, E experts, k experts a token, I expert hidden width.
Per token x (D,):
    logits = W_g x                                   (E,)  fp32
    scores = softmax(logits)  | sigmoid(logits)      "softmax" (Mixtral / Qwen-MoE) | "sigmoid" (DeepSeek-V3)
    chosen = top-k of scores (+ b, the balancing bias, when moe_balance uses it: selection only, never weights)
    w_j    = scores[chosen_j] / Σ_j scores[chosen_j]  (normalised over the k chosen)
    y      = Σ_j w_j · SwiGLU_{chosen_j}(x) + Σ_s SwiGLU_shared_s(x)
Balancing: the Switch / GShard auxiliary loss E · Σ_e f_e · P_e (f_e: share of the N·k routed slots that went to
e, P_e: mean normalised score of e), DeepSeek-V3's aux-loss-free bias (b_e += rate · sign(mean load - load_e)
after each optimizer step, from the step's loads), or both; the router z-loss mean(logsumexp(logits)²) (ST-MoE).

Experts are stored fused as HF does: ``experts.gate_up_proj`` (E, 2I, D) and ``experts.down_proj`` (E, D, I);
the router is ``gate.weight`` (E, D) with ``gate.e_score_correction_bias`` (E,). Token routing goes through a
dispatcher object (local by default); expert parallelism swaps in one that moves tokens between ranks — this
file has no ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.kind = cfg.n_experts, cfg.moe_top_k, cfg.moe_router
        self.use_bias = cfg.moe_balance in ("bias", "both")
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts), persistent=True)

    def forward(self, x: torch.Tensor):
        """x (N, D) -> (weights (N, k) fp32, experts (N, k) int64, scores (N, E) fp32, logits (N, E) fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = torch.softmax(logits, dim=-1) if self.kind == "softmax" else torch.sigmoid(logits)
        choice = scores + self.e_score_correction_bias if self.use_bias else scores
        experts = torch.topk(choice.detach(), self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        return weights, experts, scores, logits


class Experts(nn.Module):
    """E SwiGLU experts as two stacked weights; ``grouped`` runs them as one grouped GEMM over tokens sorted by
    expert (``torch._grouped_mm`` where it exists), otherwise one matmul per expert (the reference)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, i = cfg.n_experts, cfg.d_model, cfg.expert_dim
        self.hidden = i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool = True) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) tokens per expert -> (M, D)."""
        if grouped and hasattr(torch, "_grouped_mm") and x.shape[0] > 0:
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            h = torch._grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs=offsets)  # (M, 2I)
            gate, up = h.split(self.hidden, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            part = x[start:start + n]
            gate, up = F.linear(part, self.gate_up_proj[e]).split(self.hidden, dim=-1)
            out.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
            start += n
        return torch.cat(out) if out else x.new_zeros(0, x.shape[-1])


class LocalDispatcher:
    """Every expert on this process: sort the N·k (token, expert) slots by expert, run, weight, scatter back."""

    grouped = True

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, experts_idx: torch.Tensor, experts: Experts):
        n, k = experts_idx.shape
        flat = experts_idx.reshape(-1)  # (N·k,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts.gate_up_proj.shape[0])
        tokens = order // k
        y = experts(x[tokens], counts, grouped=self.grouped)  # (N·k, D)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y), counts


class MoE(nn.Module):
    """The MoE feed-forward of a block. After each forward, ``stats`` holds this micro-batch's balancing terms
    (aux loss, z-loss: differentiable means) and ``load`` accumulates routed slots per expert over the step (for
    the aux-loss-free bias, read and cleared by :func:`update_router_bias`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from pretrain.models.layers import MLP

        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        shared = cfg.n_shared_experts * cfg.expert_dim
        self.shared_experts = MLP(cfg, gated=True, bias=False, hidden=shared) if shared else None
        self.dispatcher = LocalDispatcher()
        self.register_buffer("load", torch.zeros(cfg.n_experts), persistent=False)
        self.stats: dict[str, torch.Tensor] = {}

    def reset_experts(self, std: float, residual_std: float) -> None:
        """Called by ``layers.init_weights`` (the shared experts are Linear modules it initialises itself);
        also zeroes the buffers, which are garbage after a meta-device build."""
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.experts.gate_up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=residual_std)
        self.gate.e_score_correction_bias.zero_()
        self.load.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        weights, chosen, scores, logits = self.gate(flat)
        y, counts = self.dispatcher(flat, weights, chosen, self.experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training and self.gate.use_bias:  # the step's loads for the aux-loss-free bias (not evaluation)
            with torch.no_grad():
                self.load += counts.to(self.load.dtype)
        e = self.cfg.n_experts
        share = counts.float() / max(1, chosen.numel())  # f_e
        normalised = scores / scores.sum(dim=-1, keepdim=True)  # P over experts, also for sigmoid scores
        self.stats = {"aux": e * (share * normalised.mean(dim=0)).sum(),
                      "z": torch.logsumexp(logits, dim=-1).square().mean(),
                      "max_load": counts.max().float() / counts.float().mean().clamp(min=1.0)}  # no host sync
        return y.reshape(shape)


@torch.no_grad()
def update_router_bias(moe: MoE, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing: raise the selection bias of under-loaded experts, lower it for
    over-loaded ones, by ``rate`` each step. ``load`` is the step's routed slots per expert, summed over every
    data-parallel rank by the caller so that the bias stays identical everywhere."""
    moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
    moe.load.zero_()
