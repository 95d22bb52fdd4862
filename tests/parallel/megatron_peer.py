"""Run under torchrun with 2 ranks: our tensor-parallel MLP split (column-parallel up, row-parallel down, the
plan of ``pretrain/parallel/tensor_parallel.py``) against megatron-core's ``ColumnParallelLinear`` /
``RowParallelLinear`` holding the same weights: each rank's shard, the output and the input gradient agree.
Prints ``PEER ok <max diff>`` on rank 0; exits 1 on a mismatch."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    d, f = 16, 32
    torch.manual_seed(0)
    up, down = torch.randn(f, d), torch.randn(d, f)
    x = torch.randn(3, 5, d)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(d, f, bias=False)
            self.down_proj = nn.Linear(f, d, bias=False)

        def forward(self, h):
            return self.down_proj(F.gelu(self.up_proj(h)))

    ours = MLP()
    with torch.no_grad():
        ours.up_proj.weight.copy_(up)
        ours.down_proj.weight.copy_(down)
    parallelize_module(ours, init_device_mesh("cpu", (world,)),
                       {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})

    config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                                 params_dtype=torch.float32)
    column = ColumnParallelLinear(d, f, config=config, init_method=nn.init.zeros_, bias=False, gather_output=False)
    row = RowParallelLinear(f, d, config=config, init_method=nn.init.zeros_, bias=False, input_is_parallel=True,
                            skip_bias_add=False)
    with torch.no_grad():  # Megatron's partition of the same full weights
        column.weight.copy_(up.chunk(world, dim=0)[rank])
        row.weight.copy_(down.chunk(world, dim=1)[rank])

    diffs = [
        (ours.up_proj.weight.to_local() - column.weight).abs().max(),
        (ours.down_proj.weight.to_local() - row.weight).abs().max(),
    ]
    x_ours, x_meg = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = ours(x_ours)
    y_meg, _ = row(F.gelu(column(x_meg)[0]))
    y_ours.sum().backward()
    y_meg.sum().backward()
    diffs += [(y_ours - y_meg).abs().max(), (x_ours.grad - x_meg.grad).abs().max(),
              (ours.up_proj.weight.grad.to_local() - column.weight.grad).abs().max()]
    worst = max(float(v) for v in diffs)
    if rank == 0:
        print(f"PEER {'ok' if worst < 1e-5 else 'FAILED'} {worst:.2e}", flush=True)
    dist.destroy_process_group()
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
