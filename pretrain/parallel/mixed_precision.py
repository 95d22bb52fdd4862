"""Mixed precision by parameter dtype where FSDP does not provide it: bf16 compute weights over fp32 masters.

``train.dtype = "bf16"`` runs the matmuls in bf16. Sharded (ZeRO-2/3 with several ranks), FSDP2's
``MixedPrecisionPolicy`` keeps the fp32 shards as masters and gathers bf16 copies. One process and DDP get the same
from :class:`ComputeWeights`: the module's parameters stay fp32 — what the optimizer updates, clipping measures,
checkpoints and the Hugging Face export hold, so none of them changes and old checkpoints load as before — and for
each step the local engine swaps bf16 copies of the matmul weights (every parameter of an ``nn.Linear`` and the MoE
experts' weights) into the module: copied once a step, their gradients accumulated in bf16 over the micro-batches
— by the weight-gradient GEMM itself for an ``nn.Linear`` (``_AccumulatingLinear``: ``addmm_``), through autograd
(2 + 2 read, 2 written a weight) for the rest or under activation checkpointing; autocast over fp32 weights pays
18 B: the bf16 gradient cast to fp32 and added to the fp32 one — then cast once into the fp32 parameters'
``.grad``, under DDP then averaged over its ranks in fp32 (DDP's own reduction is skipped: it would see no
gradient of the fp32 parameters). Attention's q, k and v run as one GEMM on one copy of the three, and with the
Triton SwiGLU a gated MLP's gate and up as one, into ``swiglu_packed``. Autocast stays entered once a
step for what it decides beyond the weights (norm statistics, softmax, the loss at fp32), and its casts of these
weights become no-ops. The embeddings, norms, the router and other parameters stay fp32 under autocast.

``train.mixed_precision``: ``auto`` (the default: this where it applies, FSDP's policy where sharded, autocast over
fp32 weights elsewhere), ``weights`` (the same, refused in one line for a layout it does not cover yet) or
``autocast`` (autocast over fp32 weights: each fp32 weight cast once a step by autocast's cache, its bf16 gradient
cast back and added to the fp32 one every micro-batch).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import Config

_BUCKET_ELEMENTS = 1 << 24  # fp32 elements a DDP gradient all-reduce carries at a time (64 MiB)


def not_covered(cfg: Config) -> str:
    """Why ``train.mixed_precision = "weights"`` cannot apply to this layout ("" when it can); FSDP-sharded
    layouts have it from FSDP's policy and are not asked."""
    p = cfg.parallel
    if cfg.train.dtype != "bf16":
        return 'it is bf16 training: set train.dtype = "bf16"'
    if p.engine == "deepspeed":
        return "DeepSpeed keeps its own bf16 weights (its bf16 config)"
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.ep", p.ep)):
        if value > 1:
            return f"{key} = {value} is not covered yet"
    if cfg.train.fp8 != "none":
        return "train.fp8 casts the weights itself"
    return ""


def bf16_weights(cfg: Config, sharded: bool) -> bool:
    """Whether the matmuls read bf16 weights over fp32 masters: FSDP's policy when ``sharded``, else the copies."""
    if cfg.train.dtype != "bf16" or cfg.train.mixed_precision == "autocast":
        return False
    return sharded or not not_covered(cfg)


def gemm_accumulation(cfg: Config) -> bool:
    """Whether the ``nn.Linear`` copies accumulate their weight gradients in the GEMM. Not under activation
    checkpointing: torch's recompute stops once the last tensor a backward needs is saved again, and a built-in
    matmul saves its inputs before it runs, a custom Function after — the recompute would then run each block's
    last projection again (measured: +6 % of the matmul FLOPs with full checkpointing). Not under ``torch.compile``
    (the swapped ``forward`` is not traced)."""
    return cfg.parallel.activation_checkpointing == "none" and not cfg.train.compile


def matmul_weights(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, name, parameter) of every weight a matmul reads: ``nn.Linear`` weights and biases, the MoE experts'."""
    from pretrain.models.moe import Experts

    slots = []
    for owner in module.modules():
        if isinstance(owner, (nn.Linear, Experts)):
            for name, p in owner._parameters.items():
                if p is not None and p.requires_grad and p.dtype == torch.float32:
                    slots.append((owner, name, p))
    return slots


def _fusable(linears: tuple[nn.Linear, ...], ours: set[int]) -> bool:
    """Whether these projections of one input can run as one GEMM on one copy: every weight (and every bias, or
    none) among the copies."""
    biases = [m.bias for m in linears]
    return all(id(m.weight) in ours for m in linears) and (
        all(b is None for b in biases) or all(b is not None and id(b) in ours for b in biases))


def _fused_groups(module: nn.Module, slots) -> list[tuple[nn.Module, str, tuple[nn.Linear, ...]]]:
    """(owner, attribute, projections) of each group of projections that read one input and run as one GEMM for a
    step: a gated MLP's gate and up into ``swiglu_packed`` (``MLP.gate_up``), attention's q, k and v
    (``Attention.qkv``: the output split into three views)."""
    from pretrain.models.layers import MLP, Attention

    ours = {id(p) for _, _, p in slots}
    groups = []
    for m in module.modules():
        # gate/up with the Triton SwiGLU only, which writes the (..., 2F) gradient whole: torch's silu · mul over
        # the two halves would hand back dg and du apart, and concatenating them costs more than the add it saves
        if isinstance(m, MLP) and m.gated and "swiglu" in m.ops.triton and _fusable((m.gate_proj, m.up_proj), ours):
            groups.append((m, "gate_up", (m.gate_proj, m.up_proj)))
        # q/k/v: the split's backward concatenates dq, dk and dv (H + 2K heads, read and written once) where three
        # projections add three input gradients (3 H heads' worth, read twice and written once): equal bytes with
        # as many kv heads as query heads, fewer with grouped-query attention, and one GEMM launch instead of three
        if isinstance(m, Attention) and _fusable((m.q_proj, m.k_proj, m.v_proj), ours):
            groups.append((m, "qkv", (m.q_proj, m.k_proj, m.v_proj)))
    return groups


class _AccumulatingLinear(torch.autograd.Function):
    """``F.linear`` on a bf16 weight copy whose weight gradient is accumulated by the GEMM itself: the first
    micro-batch's ``dyᵀ x`` is written, each later one added by ``addmm_`` (cuBLAS's beta = 1: the accumulation rides
    in the GEMM's epilogue; Megatron-LM's gradient-accumulation fusion) into ``weights.sums`` — no gradient tensor
    per micro-batch and no separate add. The input is cast to the weight's dtype, as autocast would, and its
    gradient cast back."""

    @staticmethod
    def forward(ctx, x, weight, bias, weights, keys):
        ctx.x_dtype = x.dtype
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight)
        ctx.weights, ctx.keys = weights, keys
        return F.linear(x, weight, bias.to(weight.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        dx = (dy @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        ctx.weights.accumulate(ctx.keys[0], dy2, x2)
        if ctx.keys[1] is not None:
            ctx.weights.add(ctx.keys[1], dy2.sum(0))
        return dx, None, None, None, None


class ComputeWeights:
    """bf16 copies of ``module``'s matmul weights for the steps of one process or of DDP (``ddp``: the wrapper,
    whose reduction this takes over)."""

    def __init__(self, module: nn.Module, ddp: nn.Module | None = None, fuse_accumulation: bool = True,
                 fuse_projections: bool = True, fp32_sums: bool = True):
        self.slots = matmul_weights(module)
        # the micro-batches' gradients summed in fp32 (train.grad_accum_dtype = "fp32", Megatron-LM's and FSDP2's
        # way: each bf16 gradient added to an fp32 sum, 2 + 4 read, 4 written a weight) or in bf16 (the GEMM adds
        # into its own output: no bytes outside it, at bf16's precision)
        self.fp32_sums = fp32_sums
        # projections of one input that run as one GEMM on one bf16 copy of their weights stacked (the parameters
        # stay apart: checkpoints, the HF export, Muon's per-matrix rule and FP8's filters see no change): a gated
        # MLP's gate and up into the Triton SwiGLU, attention's q, k and v — one launch each, and one input gradient
        self.fused = _fused_groups(module, self.slots) if fuse_projections else []
        self.parts: dict = {}  # fused copy's key -> the masters stacked in it, in order
        for owner, _, linears in self.fused:
            self.parts["w", id(owner)] = tuple(m.weight for m in linears)
            if linears[0].bias is not None:
                self.parts["b", id(owner)] = tuple(m.bias for m in linears)
        in_fused = {id(p) for group in self.parts.values() for p in group}
        self.slots = [slot for slot in self.slots if id(slot[2]) not in in_fused]
        self.masters = {id(p): p for _, _, p in self.slots}
        self.copies: dict[int, nn.Parameter] = {}  # made anew each step, as autocast's cache (read 4 B, write 2)
        self.sums: dict[int, torch.Tensor] = {}  # GEMM-accumulated bf16 gradients of the nn.Linear copies
        # the nn.Linear modules whose forward accumulates its weight gradient in the GEMM (their weight may still
        # be read directly elsewhere — the fused cross-entropy reads lm_head.weight —, which autograd accumulates)
        self.linears = list(dict.fromkeys(o for o, n, _ in self.slots if isinstance(o, nn.Linear) and n == "weight")) \
            if fuse_accumulation else []
        self.keys = {(id(o), n): id(p) for o, n, p in self.slots}  # (module, name) -> its master's key
        self.module, self.ddp = module, ddp

    @classmethod
    def for_layout(cls, cfg: Config, parallel) -> ComputeWeights | None:
        from pretrain.parallel.dims import fsdp_sharded

        if fsdp_sharded(cfg, parallel.dims) or not bf16_weights(cfg, sharded=False):
            return None
        ddp = parallel.model if isinstance(parallel.model, nn.parallel.DistributedDataParallel) else None
        return cls(parallel.module, ddp, fuse_accumulation=gemm_accumulation(cfg),
                   fuse_projections=not cfg.train.compile, fp32_sums=cfg.train.grad_accum_dtype == "fp32")

    def accumulate(self, key, dy: torch.Tensor, x: torch.Tensor) -> None:
        """Add ``dyᵀ x`` to the gradient of weight ``key``: written by the first GEMM; in bf16 added by the next
        ones' (``addmm_``), in fp32 each product added to the fp32 sum."""
        total = self.sums.get(key)
        if total is not None and not self.fp32_sums:
            total.addmm_(dy.t(), x)
        else:
            self.add(key, dy.t().mm(x))

    def add(self, key, grad: torch.Tensor) -> None:
        total = self.sums.get(key)
        if total is None:
            self.sums[key] = grad.float() if self.fp32_sums else grad
        else:
            total.add_(grad)

    def _sum_hook(self, key):
        """fp32 sums for a copy autograd accumulates (the MoE experts', a weight read directly, everything under
        activation checkpointing): each micro-batch's gradient moved into the sum."""
        def hook(copy: torch.Tensor) -> None:
            if copy.grad is not None:  # None when the copy's GEMM took its gradient (the hook fires regardless)
                self.add(key, copy.grad)
                copy.grad = None
        return hook

    @property
    def syncs_gradients(self) -> bool:
        """Whether the gradient reduction is this object's (DDP's is then never used)."""
        return self.ddp is not None

    @contextlib.contextmanager
    def step(self):
        """The step's forward and backward passes run on the bf16 copies; on leaving, the accumulated gradients are
        cast into the fp32 parameters (and averaged over DDP's ranks) and the parameters are back in the module."""
        with torch.no_grad():
            self.copies = {key: nn.Parameter(p.to(torch.bfloat16)) for key, p in self.masters.items()}
            for key, masters in self.parts.items():  # each master copied in: 4 B read, 2 written
                rows = sum(p.shape[0] for p in masters)
                stacked = torch.empty((rows, *masters[0].shape[1:]), dtype=torch.bfloat16, device=masters[0].device)
                for piece, p in zip(stacked.split([p.shape[0] for p in masters]), masters):
                    piece.copy_(p)
                self.copies[key] = nn.Parameter(stacked)
        if self.fp32_sums:
            for key, copy in self.copies.items():
                copy.register_post_accumulate_grad_hook(self._sum_hook(key))
        for owner, name, p in self.slots:
            owner._parameters[name] = self.copies[id(p)]
        for owner in self.linears:
            owner.forward = functools.partial(self._linear, owner)
        for owner, attribute, _ in self.fused:
            setattr(owner, attribute, functools.partial(self._stacked, owner))
        try:
            yield
        except BaseException:
            self._restore()
            self.copies, self.sums = {}, {}
            raise
        self._restore()
        self._gradients_to_masters()

    def _linear(self, owner: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        keys = (self.keys[id(owner), "weight"], self.keys.get((id(owner), "bias")))
        return _AccumulatingLinear.apply(x, owner.weight, owner.bias, self, keys)

    def _stacked(self, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The fused projections of ``owner`` on ``x``: their outputs side by side along the last dim."""
        weight, bias = self.copies["w", id(owner)], self.copies.get(("b", id(owner)))
        if self.linears:  # the GEMM accumulates, as for every nn.Linear
            return _AccumulatingLinear.apply(x, weight, bias, self, (("w", id(owner)),
                                                                      ("b", id(owner)) if bias is not None else None))
        return F.linear(x, weight, bias)

    def _restore(self) -> None:
        for owner, name, p in self.slots:
            owner._parameters[name] = p
        for owner in self.linears:
            del owner.forward
        for owner, attribute, _ in self.fused:
            setattr(owner, attribute, None)

    def _gradients_to_masters(self) -> None:
        for key, copy in self.copies.items():
            grad = self.sums.pop(key, None)
            if copy.grad is not None:  # read directly too (autograd's accumulation)
                grad = copy.grad if grad is None else grad.add_(copy.grad)
            if grad is None:
                continue
            if key in self.parts:  # a fused copy: each piece to its own parameter
                masters = self.parts[key]
                pieces = tuple(zip(masters, grad.split([p.shape[0] for p in masters])))
            else:
                pieces = ((self.masters[key], grad),)
            for p, g in pieces:
                if p.grad is None:
                    p.grad = g.to(torch.float32)
                else:  # a parameter some other module reads in fp32 too (a tied weight)
                    p.grad.add_(g)
        self.copies, self.sums = {}, {}
        if self.ddp is not None:
            self._all_reduce()

    def _all_reduce(self) -> None:
        """DDP's average over its ranks, in fp32, of every parameter's gradient (zeros where a rank has none, as DDP
        with ``find_unused_parameters``), in fixed buckets so every rank sends the same layout."""
        group = self.ddp.process_group
        size = dist.get_world_size(group)
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        filled = 0
        for i, p in enumerate(params):
            bucket.append(p.grad)
            filled += p.numel()
            if filled >= _BUCKET_ELEMENTS or i == len(params) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, group=group)
                flat.div_(size)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                bucket, filled = [], 0
