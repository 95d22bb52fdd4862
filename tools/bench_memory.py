#!/usr/bin/env python3
"""Per-rank bytes of parameters, gradients and optimizer state under DP and ZeRO-1/2/3, measured on the live
tensors of a real training step (not computed from a formula).

    torchrun --standalone --nproc-per-node=4 tools/bench_memory.py [--config configs/gpt_125m.toml]

Parameters are counted right after the forward pass, shards plus whatever is gathered then (ZeRO-2 keeps the
gathered copies until backward ends, ZeRO-3 frees each block's as soon as it ran), gradients and optimizer
state just before the second optimizer step. Bytes are the elements each rank holds × element size; the
largest rank is reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from pretrain.config import load_config  # noqa: E402
from pretrain.distributed import init_distributed  # noqa: E402
from pretrain.train import build_trainer  # noqa: E402

MODES = {"DP (ZeRO-0)": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3}


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def param_bytes(module) -> int:
    """Parameter bytes this rank holds: FSDP's shards plus whatever it holds gathered at the moment."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        return local_bytes(module.parameters())
    total = 0
    for m in fsdp:
        group = m._get_fsdp_state()._fsdp_param_group  # FSDP2 internals: the only view of gathered params
        for fp in group.fsdp_params if group is not None else []:
            total += local_bytes([fp.sharded_param])
            if fp.sharded_state.name == "UNSHARDED":  # a DTensor (TP, EP) when gathered over dp only
                total += local_bytes([fp.unsharded_param])
    return total


def optimizer_tensors(optimizer):
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer holds its partition's optimizer
    for state in inner.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def measure(config: str, zero_stage: int, info, run_dir: str, seq_len: int) -> dict[str, int]:
    cfg = load_config(config, [f"parallel.zero_stage={zero_stage}", "train.steps=2", "train.micro_batch_size=1",
                               f"model.seq_len={seq_len}", "data.source=synthetic", "eval.interval=0",
                               "checkpoint.interval=0", "checkpoint.resume=never", "logging.interval=0",
                               "logging.tensorboard=false", f"logging.run_dir={run_dir}", "train.device=cpu"])
    trainer = build_trainer(cfg, info)
    module, seen = trainer.raw_model, {}

    def after_forward(_module, _inputs, _output):
        seen["params"] = param_bytes(module)

    def before_step(*_args, **_kwargs):
        seen["grads"] = local_bytes(p.grad for p in module.parameters())
        seen["optimizer"] = local_bytes(optimizer_tensors(trainer.optimizer))

    module.register_forward_hook(after_forward)
    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.fit()
    out = torch.tensor([seen["params"], seen["grads"], seen["optimizer"]], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return dict(zip(("params", "grads", "optimizer"), out.tolist()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt_125m.toml")
    parser.add_argument("--seq-len", type=int, default=128, help="short sequences: the state is what is measured")
    args = parser.parse_args()
    info = init_distributed("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: measure(args.config, stage, info, f"{tmp}/{stage}", args.seq_len)
                for name, stage in MODES.items()}
    if info.rank == 0:
        print(f"{Path(args.config).stem}, {info.world_size} ranks, largest rank, MiB")
        print("| mode | params | grads | optimizer state | total |")
        print("|---|---|---|---|---|")
        for name, r in rows.items():
            mib = {k: v / 2 ** 20 for k, v in r.items()}
            print(f"| {name} | {mib['params']:.0f} | {mib['grads']:.0f} | {mib['optimizer']:.0f} | "
                  f"{sum(mib.values()):.0f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
