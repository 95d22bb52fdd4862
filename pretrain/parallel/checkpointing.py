"""Activation checkpointing (Chen et al. 2016): a wrapped block keeps only its input and recomputes its
activations during backward. ``full`` wraps every block, ``selective`` every k-th (k =
``parallel.activation_checkpointing_every``), trading memory for ~1/k of the recompute. A block with MoE layers
recomputes under ``step.recompute_context``: the re-run forward adds nothing to the layers' loads."""

from __future__ import annotations

import torch.nn as nn


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Wrap blocks of ``model.layers`` in place; returns how many were wrapped."""
    if mode == "none":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from pretrain.models.moe import moe_layers
    from pretrain.step import recompute_context

    wrapped = 0
    for name, block in list(model.layers.items()):
        if mode == "full" or int(name) % every == 0:
            extra = {"context_fn": recompute_context} if moe_layers(block) else {}
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True, **extra)
            wrapped += 1
    return wrapped


def apply_compile(model: nn.Module) -> None:
    """Compile each block on its own (torchtitan): small graphs, shared by identical blocks, and composable
    with FSDP's per-block hooks."""
    import torch

    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block)
