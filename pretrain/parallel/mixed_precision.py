"""Mixed precision by parameter dtype where FSDP does not provide it: bf16 compute weights over fp32 masters.

``train.dtype = "bf16"`` runs the matmuls in bf16. Sharded (ZeRO-2/3 with several ranks), FSDP2's
``MixedPrecisionPolicy`` keeps the fp32 shards as masters and gathers bf16 copies. One process and DDP get the same
from :class:`ComputeWeights`: the module's parameters stay fp32 — what the optimizer updates, clipping measures,
checkpoints and the Hugging Face export hold, so none of them changes and old checkpoints load as before — and for
each step the local engine swaps bf16 copies of the matmul weights (every parameter of an ``nn.Linear`` and the MoE
experts' weights) into the module: copied once a step, their gradients accumulated in bf16 over the micro-batches
(2 + 2 read, 2 written a weight; autocast over fp32 weights pays 18 B: the bf16 gradient cast to fp32 and added to
the fp32 one), then cast once into the fp32 parameters' ``.grad`` — under DDP then averaged over its ranks in fp32
(DDP's own reduction is skipped: it would see no gradient of the fp32 parameters). Autocast stays entered once a
step for what it decides beyond the weights (norm statistics, softmax, the loss at fp32), and its casts of these
weights become no-ops. The embeddings, norms, the router and other parameters stay fp32 under autocast.

``train.mixed_precision``: ``auto`` (the default: this where it applies, FSDP's policy where sharded, autocast over
fp32 weights elsewhere), ``weights`` (the same, refused in one line for a layout it does not cover yet) or
``autocast`` (autocast over fp32 weights: each fp32 weight cast once a step by autocast's cache, its bf16 gradient
cast back and added to the fp32 one every micro-batch).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

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


class ComputeWeights:
    """bf16 copies of ``module``'s matmul weights for the steps of one process or of DDP (``ddp``: the wrapper,
    whose reduction this takes over)."""

    def __init__(self, module: nn.Module, ddp: nn.Module | None = None):
        self.slots = matmul_weights(module)
        self.masters = {id(p): p for _, _, p in self.slots}
        self.copies: dict[int, nn.Parameter] = {}  # made anew each step, as autocast's cache (read 4 B, write 2)
        self.module, self.ddp = module, ddp

    @classmethod
    def for_layout(cls, cfg: Config, parallel) -> ComputeWeights | None:
        from pretrain.parallel.dims import fsdp_sharded

        if fsdp_sharded(cfg, parallel.dims) or not bf16_weights(cfg, sharded=False):
            return None
        ddp = parallel.model if isinstance(parallel.model, nn.parallel.DistributedDataParallel) else None
        return cls(parallel.module, ddp)

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
        for owner, name, p in self.slots:
            owner._parameters[name] = self.copies[id(p)]
        try:
            yield
        except BaseException:
            self._restore()
            self.copies = {}
            raise
        self._restore()
        self._gradients_to_masters()

    def _restore(self) -> None:
        for owner, name, p in self.slots:
            owner._parameters[name] = p

    def _gradients_to_masters(self) -> None:
        for key, copy in self.copies.items():
            p = self.masters[key]
            if copy.grad is None:
                continue
            if p.grad is None:
                p.grad = copy.grad.to(torch.float32)
            else:  # a parameter some other module reads in fp32 too (a tied weight)
                p.grad.add_(copy.grad)
        self.copies = {}
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
