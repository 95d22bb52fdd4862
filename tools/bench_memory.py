#!/usr/bin/env python3
"""Per-rank bytes of parameters, gradients and optimizer state under DP and ZeRO-1/2/3, measured on the live
tensors of a real training step (not computed from a formula).

    torchrun --standalone --nproc-per-node=4 tools/bench_memory.py [--config configs/gpt_125m.toml]
    torchrun --standalone --nproc-per-node=4 tools/bench_memory.py --layout NAME "k=v k=v" [--layout ...]

The second form measures any layout the trainer accepts, against what ``pretrain.plan`` predicts for it, and
prints one line per layout: ``MEMORY name {"measured": {...}, "predicted": {...}}`` (largest rank). Measured:
parameters, gradients and optimizer state as this rank's local tensors just before the second optimizer step
(nothing gathered then), activations as the peak bytes of the tensors autograd holds for backward (saved-tensor
hooks: each storage counted once while any saved reference to it lives; parameters and their views left out),
per step above what was still held when the step began (``retained_bytes``: torch 2.13's pipeline stages keep
their shape-inference forward's graph for good — 0.25 MB of 0.98 MB on the first of two 1F1B stages here).

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


class SavedTensors:
    """Peak bytes of the activations autograd keeps for backward (each storage once while referenced)."""

    def __init__(self, params):
        self.params = {id(p) for p in params}
        self.live: dict[int, list] = {}  # storage ptr -> [refs, bytes]
        self.now = self.peak = self.base = 0
        self.steps: list[int] = []  # per step: its peak above what was live when it began

    def step_done(self) -> None:
        """Close a step: what is still live now (a pipeline schedule's retained shape-inference graph) is the
        next step's base, not its activations."""
        self.steps.append(self.peak - self.base)
        self.base = self.peak = self.now

    def _is_param(self, t) -> bool:
        base = t._base if t._base is not None else t
        return id(base) in self.params or (base.is_leaf and base.requires_grad)

    def pack(self, saved):
        from torch.distributed.tensor import DTensor

        t = saved.to_local() if isinstance(saved, DTensor) else saved
        if self._is_param(t) or self._is_param(saved) or t.device.type == "meta":
            return saved
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a wrapper without real storage (async collective result): its own bytes
            key, nbytes = id(t), t.numel() * t.element_size()
        entry = self.live.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        return _Held(self, key, saved)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, owner, key, tensor):
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self):
        entry = self.owner.live.get(self.key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.owner.now -= entry[1]
                del self.owner.live[self.key]


def measure_layout(overrides: list[str], info, run_dir: str) -> dict[str, int]:
    """The largest rank's bytes of one layout: parameters, gradients, optimizer state (before the second
    optimizer step) and activations (peak over the first two steps)."""
    cfg = load_config(None, [*overrides, "train.steps=2", "data.source=synthetic", "eval.interval=0",
                             "checkpoint.interval=0", "checkpoint.resume=never", "logging.interval=0",
                             "logging.tensorboard=false", f"logging.run_dir={run_dir}", "train.device=cpu"])
    trainer = build_trainer(cfg, info)
    parts = trainer.parallel.parts or [trainer.raw_model]
    params = [p for part in parts for p in part.parameters()]
    saved, seen = SavedTensors(params), {}

    def before_step(*_args, **_kwargs):
        seen["params_bytes"] = local_bytes(params)
        seen["grads_bytes"] = local_bytes(p.grad for p in params)
        seen["optimizer_bytes"] = local_bytes(optimizer_tensors(trainer.optimizer))

    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.optimizer.register_step_post_hook(lambda *_: saved.step_done())
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        trainer.fit()
    seen["activations_bytes"] = saved.steps[-1]  # the steady step (the first one also builds what is retained)
    seen["retained_bytes"] = saved.base  # still held after the last step
    keys = sorted(seen)
    out = torch.tensor([seen[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return {k: int(v) for k, v in zip(keys, out.tolist())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt_125m.toml")
    parser.add_argument("--seq-len", type=int, default=128, help="short sequences: the state is what is measured")
    parser.add_argument("--layout", nargs=2, action="append", metavar=("NAME", "OVERRIDES"),
                        help="measure this layout (space-separated section.key=value) against pretrain.plan")
    args = parser.parse_args()
    info = init_distributed("cpu")
    if args.layout:
        import json

        from pretrain.plan.memory import estimate_memory

        with tempfile.TemporaryDirectory() as tmp:
            for name, overrides in args.layout:
                sets = overrides.split()
                measured = measure_layout(sets, info, f"{tmp}/{name}")
                predicted = estimate_memory(load_config(None, sets), info.world_size).as_dict()
                if info.rank == 0:
                    print(f"MEMORY {name} " + json.dumps({"measured": measured, "predicted": predicted}), flush=True)
                dist.barrier()
        dist.destroy_process_group()
        return 0
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
