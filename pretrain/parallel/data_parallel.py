"""Data parallelism by ZeRO stage (Rajbhandari et al. 2020).

- stage 0: DDP — replicas, gradients all-reduced.
- stage 1: DDP + ``ZeroRedundancyOptimizer``: optimizer state partitioned over the data-parallel ranks.
- stage 2: FSDP2 with ``reshard_after_forward=False``: gradients and optimizer state sharded, parameters kept
  gathered between forward and backward.
- stage 3: FSDP2: parameters sharded too (gathered per block just in time).
- HSDP: with ``dp_replicate > 1`` FSDP shards within ``dp_shard`` and replicates across ``dp_replicate``.

FSDP wraps each block, then the root, so a block's parameters are gathered only while it runs. bf16 training
uses a mixed-precision policy: bf16 compute, fp32 gradient reduction, fp32 master parameters.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from pretrain.distributed import local_part


def apply_fsdp(model: nn.Module, dp_mesh, *, reshard_after_forward: bool, bf16: bool, cpu_offload: bool,
               expert_mesh=None) -> None:
    """FSDP per block, then the root. With expert parallelism (``expert_mesh``: the ranks holding the same
    experts) each MoE layer's experts are their own FSDP unit over that mesh."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    from pretrain.models.moe import moe_layers

    kwargs = {"mesh": dp_mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    # the multi-token-prediction modules (after the last block, before the head's use) are units of their own too
    blocks = list(model.layers.values()) + list(getattr(model, "mtp", None) or [])
    for i, block in enumerate(blocks):
        # the last block is resharded by the root's backward anyway
        reshard = reshard_after_forward and i < len(blocks) - 1
        if expert_mesh is not None:
            for layer in moe_layers(block):
                local = local_part(layer.experts.gate_up_proj).shape[0]  # experts on this ep rank
                dim = 0 if local % expert_mesh.size() == 0 else 1  # too few experts to shard: the hidden dim
                fully_shard(layer.experts, reshard_after_forward=reshard, shard_placement_fn=lambda p, d=dim: Shard(d),
                            **{**kwargs, "mesh": expert_mesh})
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


def apply_ddp(model: nn.Module, dp_mesh, device: torch.device) -> nn.Module:
    # find_unused_parameters keeps DDP's first bucket layout for good. Without it DDP reduces the first step in one
    # bucket and then re-buckets by gradient-ready order; the summation order inside a ring all-reduce depends on
    # where an element sits in its bucket, so a resumed run (whose first step is again one bucket) would drift from
    # an uninterrupted one in the last bits. The price is one walk over the autograd graph per step, and a one-time
    # "did not find any unused parameters" warning from each rank.
    return nn.parallel.DistributedDataParallel(
        model, process_group=dp_mesh.get_group(), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, active: bool):
    """Skip the gradient reduction of a micro-batch that is not the last of the step (DDP or FSDP2)."""
    if not active:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def clip_grad_norm(parameters, max_norm: float, pp_group=None, not_counted=()) -> torch.Tensor:
    """Total L2 norm of all gradients, each element counted once whatever its sharding; clips in place.

    DTensor gradients are grouped by (mesh, placements) so each group reduces once; a pipeline stage holds
    its own parameters, so the squared norms of the stages are summed over ``pp_group``. ``not_counted``
    parameters (a second copy of a tied weight) are clipped but left out of the norm.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    skip = {id(p) for p in not_counted}
    grads = [p.grad for p in parameters if p.grad is not None]
    counted = [p.grad for p in parameters if p.grad is not None and id(p) not in skip]
    groups: dict = {}
    for g in counted:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    device = local_part(grads[0]).device if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if grads and max_norm < float("inf"):
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([local_part(g) for g in grads], scale)
    return total
