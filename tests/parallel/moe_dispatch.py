"""Run under torchrun (2 ranks; the harness runs ``checks`` inside its 2-rank launch): the expert-parallel all-to-all dispatcher against the local one, including the
case where every token goes to the other rank's experts (this rank's experts run on nothing), and a backward
that asks only for the input gradient (what a pipeline schedule's shape inference does). Prints
``MOEDISPATCH case out_diff grad_diff``; a rank whose backward skipped an all-to-all would hang the other."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config import load_config  # noqa: E402
from pretrain.models.moe import AllToAllDispatcher, MoE  # noqa: E402


def checks() -> bool:
    """Both cases on this launch's 2 ranks (the process group exists); returns whether one failed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_experts=4", "model.moe_top_k=2",
                             "model.moe_ffn_hidden=8"]).model
    failed = False
    for case in ("balanced", "all_on_rank_0"):
        torch.manual_seed(0)
        local = MoE(cfg)
        local.reset_experts(0.5, 0.5)
        if case == "all_on_rank_0":  # experts 0 and 1 (rank 0's) win every token: rank 1's experts get none
            with torch.no_grad():
                local.gate.weight.zero_()
                local.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))
                local.gate.use_bias = True
        x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1 + rank), requires_grad=True)
        ref = local(x)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
        ep = MoE(cfg)
        ep.load_state_dict(local.state_dict())
        ep.gate.use_bias = local.gate.use_bias
        per = cfg.n_experts // world
        with torch.no_grad():
            ep.experts.gate_up_proj = torch.nn.Parameter(local.experts.gate_up_proj[rank * per:(rank + 1) * per].clone())
            ep.experts.down_proj = torch.nn.Parameter(local.experts.down_proj[rank * per:(rank + 1) * per].clone())
        ep.dispatcher = AllToAllDispatcher(dist.group.WORLD, world)
        out = ep(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)  # the input's gradient only
        out_diff = (out - ref).abs().max().item()
        grad_diff = (grad - ref_grad).abs().max().item()
        ok = out_diff <= 1e-5 and grad_diff <= 1e-5
        failed |= not ok
        flag = torch.tensor(float(not ok))
        dist.all_reduce(flag)
        if rank == 0:
            print(f"MOEDISPATCH {case} {'ok' if flag.item() == 0 else 'FAILED'} out_diff={out_diff:.2e} "
                  f"grad_diff={grad_diff:.2e}", flush=True)
    dist.barrier()
    return failed


def main() -> int:
    dist.init_process_group("gloo")
    failed = checks()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
