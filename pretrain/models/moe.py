"""Mixture-of-Experts feed-forward (Shazeer et al. 2017; Switch, Fedus et al. 2021; DeepSeek-V3, 2024), dropless.

Shapes: N tokens (B·T flattened), D model dim, E experts, k experts a token, I expert hidden width.
Per token x (D,):
    logits = W_g x                                   (E,)  fp32
    scores = softmax(logits)  | sigmoid(logits)      "softmax" (Mixtral / Qwen-MoE) | "sigmoid" (DeepSeek-V3)
    chosen = top-k of scores (+ b, the balancing bias, when moe_balance uses it: selection only, never weights);
             with moe_n_group G > 1 (DeepSeek-V3's group-limited routing) only within the moe_topk_group groups
             (of E/G experts, in order) whose two best biased scores sum highest, the others' experts masked out
    w_j    = s · scores[chosen_j] / Σ_j scores[chosen_j]  (normalised over the k chosen; s = moe_routed_scaling)
    y      = Σ_j w_j · SwiGLU_{chosen_j}(x) + Σ_s SwiGLU_shared_s(x)
Balancing: the Switch / GShard auxiliary loss E · Σ_e f_e · P_e (f_e: share of the routed slots that went to e,
P_e: mean normalised score of e) over each sequence (``moe_aux_scope = "sequence"``, DeepSeek-V3's sequence-wise
loss, the same whatever the micro-batching) or over the micro-batch (Switch); DeepSeek-V3's aux-loss-free bias
(b_e += rate · sign(mean load - load_e) after each optimizer step, from the step's loads over every rank), or
both; the router z-loss mean(logsumexp(logits)²) (ST-MoE). The loss terms enter the backward at the layer
itself (Megatron's aux-loss scaler): a pipeline stage's layers need no path to the last stage's loss.

Capacity (``moe_capacity_factor`` cf > 0, GShard): each expert takes at most ceil(cf · N·k / E) of a micro-batch's
slots, earlier tokens first; a dropped slot adds nothing (the residual carries the token). Dropless by default.

Experts are stored fused as HF does: ``experts.gate_up_proj`` (E, 2I, D) and ``experts.down_proj`` (E, D, I);
the router is ``gate.weight`` (E, D) with ``gate.e_score_correction_bias`` (E,). Token routing goes through a
dispatcher object: local by default, :class:`AllToAllDispatcher` under expert parallelism (experts split over
the ``ep`` ranks, tokens sent to their experts' ranks and back with two all-to-alls of uneven splits).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain import step
from pretrain.config import ModelConfig
from pretrain.distributed import local_part
from pretrain.models.layers import compute_dtype


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.kind = cfg.n_experts, cfg.moe_top_k, cfg.moe_router
        self.use_bias = cfg.moe_balance in ("bias", "both")
        self.n_group, self.topk_group = cfg.moe_n_group, cfg.moe_topk_group
        self.scaling = cfg.moe_routed_scaling
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts), persistent=True)

    def forward(self, x: torch.Tensor):
        """x (N, D) -> (weights (N, k) fp32, experts (N, k) int64, scores (N, E) fp32, logits (N, E) fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = torch.softmax(logits, dim=-1) if self.kind == "softmax" else torch.sigmoid(logits)
        choice = scores + self.e_score_correction_bias if self.use_bias else scores
        choice = choice.detach()
        if self.n_group > 1:  # group-limited: the best topk_group groups by the sum of their two best scores
            groups = choice.view(choice.shape[0], self.n_group, -1)  # (N, G, E/G)
            group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            best = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep[:, :, None].expand_as(groups).reshape_as(choice), float("-inf"))
        experts = torch.topk(choice, self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return weights, experts, scores, logits


class Experts(nn.Module):
    """E SwiGLU experts as two stacked weights; ``grouped`` runs them as one grouped GEMM over tokens sorted by
    expert (``torch._grouped_mm`` where it exists), otherwise one matmul per expert (the reference). Under expert
    parallelism the weights are DTensors sharded over the experts and this rank runs its own E/ep."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, i = cfg.n_experts, cfg.d_model, cfg.expert_dim
        self.hidden = i
        self.grad_scale = 1.0  # expert parallelism: 1/ep (see parallel/expert_parallel.py)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool = True) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) tokens per (local) expert -> (M, D)."""
        gate_up, down = local_part(self.gate_up_proj), local_part(self.down_proj)
        # the grouped GEMM is not an autocast op: the inputs in the dtype an autocast matmul would take
        x, gate_up, down = compute_dtype(x), compute_dtype(gate_up), compute_dtype(down)
        if self.grad_scale != 1.0:
            gate_up, down = _ScaleGrad.apply(gate_up, self.grad_scale), _ScaleGrad.apply(down, self.grad_scale)
        if x.shape[0] == 0:
            # no token here: the output must still depend on x and on every weight, so that this rank's backward
            # runs the same collectives as the others (under expert parallelism x comes from an all-to-all whose
            # backward is one: a graph without that edge skipped it and hung the other ranks) and FSDP gets a
            # (zero) gradient for every weight
            return x * 0 + 0 * (gate_up.sum() + down.sum()).to(x.dtype)
        if grouped and hasattr(torch, "_grouped_mm"):
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offsets)  # (M, 2I)
            gate, up = h.split(self.hidden, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            part = x[start:start + n]
            gate, up = F.linear(part, gate_up[e]).split(self.hidden, dim=-1)
            out.append(F.linear(F.silu(gate) * up, down[e]))
            start += n
        return torch.cat(out)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def route(chosen: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity: int):
    """The (token, expert) slots of a micro-batch sorted by expert (token order inside one expert).

    chosen, weights (N, k) -> token (S,) int64, weight (S,) fp32, counts (E,) kept slots per expert, routed (E,)
    slots per expert before any drop, dropped () slots over capacity (0 when ``capacity`` is 0: dropless)."""
    k = chosen.shape[1]
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    routed = torch.bincount(flat, minlength=n_experts)
    token, weight = order // k, weights.reshape(-1)[order]
    if not capacity:
        return token, weight, routed, routed, routed.new_zeros(())
    starts = torch.cumsum(routed, 0) - routed
    position = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # rank inside its expert
    keep = position < capacity
    counts = routed.clamp(max=capacity)
    return token[keep], weight[keep], counts, routed, (routed - counts).sum()


class LocalDispatcher:
    """Every expert on this process: run the sorted slots through them."""

    grouped = True

    def __call__(self, x: torch.Tensor, token: torch.Tensor, counts: torch.Tensor, experts: Experts) -> torch.Tensor:
        """x (N, D), token (S,) sorted by expert, counts (E,) -> expert outputs (S, D) in slot order."""
        return experts(x[token], counts, grouped=self.grouped)


class AllToAllDispatcher:
    """Expert parallelism over ``group`` (``ep`` ranks, rank r holding experts [r·E/ep, (r+1)·E/ep)): the slots,
    already sorted by expert and so grouped by destination rank, go out in one all-to-all of uneven splits (sizes
    from a first all-to-all of the per-expert counts); the received tokens are regrouped by local expert, run, put
    back in arrival order and returned by the reverse all-to-all. Both all-to-alls are differentiable (their
    backward is the opposite exchange)."""

    grouped = True

    def __init__(self, group, ep: int):
        self.group, self.ep = group, ep

    def __call__(self, x: torch.Tensor, token: torch.Tensor, counts: torch.Tensor, experts: Experts) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        ep, local = self.ep, counts.numel() // self.ep
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [source, my expert]
        received = received.view(ep, local)
        send_splits = counts.view(ep, local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        inbound = all_to_all_single_autograd(x[token], recv_splits, send_splits, self.group)
        # arrival order is (source, expert): sort it to (expert, source) for the grouped GEMM
        segment = torch.repeat_interleave(torch.arange(ep * local, device=counts.device), received.reshape(-1))
        order = torch.argsort((segment % local) * ep + segment // local, stable=True)
        out = experts(inbound[order], received.sum(0), grouped=self.grouped)
        out = out[torch.argsort(order)]  # back to arrival order
        return all_to_all_single_autograd(out, send_splits, recv_splits, self.group)


class _LossAtLayer(torch.autograd.Function):
    """Identity on ``y`` whose backward also gives the layer's balancing loss the gradient ``scale`` (the active
    step's normalisation, ``pretrain/step.py``): the loss terms join the objective here, whatever stage runs it."""

    @staticmethod
    def forward(ctx, y, loss, scale):
        ctx.save_for_backward(scale)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad, scale.to(torch.float32).reshape(()), None


class MoE(nn.Module):
    """The MoE feed-forward of block ``index``. While training it accumulates, over the step, the routed slots per
    expert (``load``) and ``totals`` = [Σ aux · tokens, Σ z · tokens, tokens, dropped slots]; the
    ``MoEBalance`` callback sums them over the ranks, updates the bias and logs them, then clears them."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        from pretrain.models.layers import MLP

        self.cfg, self.index = cfg, index
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        shared = cfg.n_shared_experts * cfg.expert_dim
        self.shared_experts = MLP(cfg, gated=True, bias=False, hidden=shared) if shared else None
        self.dispatcher = LocalDispatcher()
        self.aux_coef = cfg.moe_aux_coef if cfg.moe_balance in ("aux_loss", "both") else 0.0
        self.register_buffer("load", torch.zeros(cfg.n_experts), persistent=False)
        self.register_buffer("totals", torch.zeros(4), persistent=False)

    def reset_experts(self, std: float, residual_std: float) -> None:
        """Called by ``layers.init_weights`` (the shared experts are Linear modules it initialises itself);
        also zeroes the buffers, which are garbage after a meta-device build."""
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.experts.gate_up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=residual_std)
        self.gate.e_score_correction_bias.zero_()
        self.clear_step()

    def clear_step(self) -> None:
        self.load.zero_()
        self.totals.zero_()

    def capacity(self, n_tokens: int) -> int:
        cf = self.cfg.moe_capacity_factor
        return math.ceil(cf * n_tokens * self.cfg.moe_top_k / self.cfg.n_experts) if cf else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, D)
        flat = x.reshape(-1, shape[-1])  # (N, D)
        weights, chosen, scores, logits = self.gate(flat)
        token, weight, counts, routed, dropped = route(chosen, weights, self.cfg.n_experts,
                                                      self.capacity(flat.shape[0]))
        y = self.dispatcher(flat, token, counts, self.experts)
        y = torch.zeros_like(flat, dtype=y.dtype).index_add_(0, token, y * weight[:, None].to(y.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            counted = step.counting() and not flat.is_meta  # not a recomputation nor a shape inference
            aux = self._aux_sum(chosen, scores, shape[0]) if self.aux_coef or counted else None
            z = torch.logsumexp(logits, dim=-1).square().sum()  # summed over tokens, like the loss
            terms = z * self.cfg.moe_z_coef + (aux * self.aux_coef if self.aux_coef else 0.0)
            if torch.is_grad_enabled() and terms.requires_grad:
                y = _LossAtLayer.apply(y, terms, step.loss_scale(y.device))
            if counted:
                with torch.no_grad():
                    self.load += routed.to(self.load.dtype)
                    self.totals += torch.stack([aux.detach(), z.detach(), z.new_tensor(float(flat.shape[0])),
                                                dropped.to(z.dtype)]).to(self.totals.dtype)
        return y.reshape(shape)

    def _aux_sum(self, chosen: torch.Tensor, scores: torch.Tensor, batch: int) -> torch.Tensor:
        """E · Σ_e f_e · P_e per group (a sequence, or the whole micro-batch), times the group's tokens, summed."""
        e, k = self.cfg.n_experts, chosen.shape[1]
        groups = batch if self.cfg.moe_aux_scope == "sequence" else 1
        normalised = scores / scores.sum(dim=-1, keepdim=True)  # P over experts, also for sigmoid scores
        per_group = chosen.reshape(groups, -1)  # (G, tokens·k)
        tokens = per_group.shape[1] // k
        counts = torch.zeros(groups, e, device=chosen.device).scatter_add_(
            1, per_group, torch.ones(per_group.shape, device=chosen.device))
        share = counts / (tokens * k)  # f (G, E)
        mean_score = normalised.reshape(groups, tokens, e).mean(dim=1)  # P (G, E)
        return e * (share * mean_score).sum() * tokens


def moe_layers(module: nn.Module) -> list[MoE]:
    """The MoE layers of a model (or of one pipeline stage, or one block)."""
    return [m for m in module.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_router_bias(moe: MoE, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing: raise the selection bias of under-loaded experts, lower it for
    over-loaded ones, by ``rate`` each step. ``load`` is the step's routed slots per expert, summed over every
    data-parallel rank by the caller so that the bias stays identical everywhere."""
    moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load).to(
        moe.gate.e_score_correction_bias.dtype)
