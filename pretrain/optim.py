"""Optimizers, their parameter groups and learning-rate schedules: one builder per optimizer, so a second one
(Muon for matrices beside AdamW for the rest) is one more function here, not a trainer change."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pretrain.config import ConfigError, OptimConfig, ScheduleConfig


def lr_at(step: int, optim: OptimConfig, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate for update ``step`` (0-based): linear warmup, then cosine / linear / WSD / constant."""
    s, o, total = schedule, optim, total_steps
    if step < s.warmup_steps:
        return o.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return o.lr
    if s.decay == "wsd":  # warmup-stable-decay (Hu et al. 2024): flat, then linear to min_lr at the end
        decay_start = max(s.warmup_steps, int(total * (1 - s.decay_fraction)))
        if step < decay_start:
            return o.lr
        progress = (step - decay_start) / max(1, total - decay_start)
        return o.lr - (o.lr - o.min_lr) * min(1.0, progress)
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    if s.decay == "linear":
        return o.lr - (o.lr - o.min_lr) * progress
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matmul weights only: not on norms, biases or embeddings."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, other = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (other if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, o: OptimConfig, device: torch.device, zero1_group=None) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA; Triton's FusedAdamW or apex's FusedAdam by ``optim.impl``); with ``zero1_group`` its
    state is partitioned over those ranks (ZeRO-1). ``optim.name = "muon"``: Muon for the hidden matrices and AdamW
    for the rest, one optimizer (``pretrain/muon.py``)."""
    betas = (o.beta1, o.beta2)
    if o.name == "muon":
        from pretrain.muon import MuonAdamW, muon_groups

        return MuonAdamW(muon_groups(model, o.weight_decay), lr=o.lr, betas=betas, eps=o.eps,
                         momentum=o.muon_momentum, nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps,
                         lr_scale=o.muon_lr / o.lr if o.muon_lr else 1.0, ns_dtype=o.muon_ns_dtype)
    groups = param_groups(model, o.weight_decay)
    if o.impl == "triton":
        try:
            from pretrain.kernels.adamw import FusedAdamW
        except (ImportError, RuntimeError) as exc:
            raise ConfigError(f'optim.impl = "triton" needs triton ({exc}): pip install -e \'.[triton]\'') from None
        return FusedAdamW(groups, lr=o.lr, betas=betas, eps=o.eps)
    if o.impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ConfigError('optim.impl = "apex" needs NVIDIA apex, which is not installed (it is not on PyPI: '
                              'build it from github.com/NVIDIA/apex), or use "torch" / "triton"') from None
        return FusedAdam(groups, lr=o.lr, betas=betas, eps=o.eps, adam_w_mode=True)
    kwargs = {"lr": o.lr, "betas": betas, "eps": o.eps, "fused": device.type == "cuda"}
    if zero1_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                            process_group=zero1_group, weight_decay=o.weight_decay, **kwargs)
        optimizer.add_param_group({"params": groups[1]["params"], "weight_decay": 0.0})
        return optimizer
    return torch.optim.AdamW(groups, **kwargs)
