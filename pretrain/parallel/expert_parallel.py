"""Expert parallelism (GShard, Lepikhin et al. 2020; torchtitan's layout): each MoE layer's experts split over the
``ep`` ranks of the mesh (taken from ``dp_shard × cp``, see ``dims.py``), tokens moved to them and back by the layer's
:class:`~pretrain.models.moe.AllToAllDispatcher`.

The stacked expert weights become DTensors sharded on the expert dim over ``ep``; FSDP then shards them further
over ``dp_shard_mod_ep`` (the ranks holding the same experts). An expert's gradient on its owner already sums the
tokens of every rank in its ep group, and FSDP averages it over the dp · cp / ep ranks holding that expert:
the experts scale their gradient by 1/ep so that the result is the mean over the whole dp × cp, as for every
other weight. (FSDP's own ``set_gradient_divide_factor`` would do the same but reduces with PREMUL_SUM, which gloo
lacks.) Router, shared experts, attention and norms are sharded over
the whole dp as in a dense model. DCP sees the global (E, ·, ·) tensors: checkpoints reshard between EP sizes.
"""

from __future__ import annotations

import torch.nn as nn


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    """Shard every MoE layer's experts of ``model`` (whole model or one pipeline stage) over ``ep_mesh``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from pretrain.models.moe import AllToAllDispatcher, moe_layers

    for layer in moe_layers(model):
        experts = layer.experts
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(weight.data, ep_mesh, [Shard(0)]),
                                                requires_grad=weight.requires_grad))
        experts.grad_scale = 1.0 / ep_mesh.size()
        grouped = layer.dispatcher.grouped
        layer.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), ep_mesh.size())
        layer.dispatcher.grouped = grouped
