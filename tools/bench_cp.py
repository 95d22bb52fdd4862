#!/usr/bin/env python3
"""Context parallelism on CPU: per-rank activation memory of one long sequence for CP 1 / 2 / 4, and the step
time of ring vs all-to-all attention, in one run.

    torchrun --standalone --nproc-per-node=4 tools/bench_cp.py [--config configs/gpt_tiny.toml] [--seq 8192]

Activations are what autograd saves for the backward, counted as it saves them (``saved_tensors_hooks``): each
distinct storage once, parameters left out; one micro-batch of one sequence a rank (CP c: that sequence's T / c
tokens on each of the c ranks, the other 4 / c ranks data-parallel). Step time: the median of ``--steps`` training
steps (forward, backward, AdamW) of each layout, the largest rank's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from pretrain.config import load_config  # noqa: E402
from pretrain.distributed import init_distributed  # noqa: E402
from pretrain.train import build_trainer  # noqa: E402


class SavedBytes:
    """Bytes of the tensors autograd saves while active (distinct storages, parameters excluded)."""

    def __init__(self, params):
        self.params = {p.data_ptr() for p in params}
        self.seen: set = set()
        self.total = 0

    def pack(self, t: torch.Tensor):
        from torch.distributed.tensor import DTensor

        local = t.to_local() if isinstance(t, DTensor) else t
        if local.device.type != "meta" and local.untyped_storage().data_ptr() not in self.params:
            key = (local.untyped_storage().data_ptr(), local.untyped_storage().nbytes())
            if key not in self.seen:
                self.seen.add(key)
                self.total += key[1]
        return t

    @staticmethod
    def unpack(t):
        return t


def measure(config: str, seq: int, cp: int, impl: str, steps: int, info, run_dir: str) -> tuple[float, float]:
    cfg = load_config(config, [f"model.seq_len={seq}", f"parallel.cp={cp}", f"parallel.cp_impl={impl}",
                               "train.micro_batch_size=1", "train.grad_accum=1", f"train.steps={steps + 1}",
                               "data.source=synthetic", "eval.interval=0", "checkpoint.interval=0",
                               "checkpoint.resume=never", "logging.interval=0", "logging.tensorboard=false",
                               f"logging.run_dir={run_dir}", "train.device=cpu"])
    trainer = build_trainer(cfg, info)
    counter = SavedBytes(trainer.raw_model.parameters())
    times, step = [], trainer.train_step

    def timed():
        start = time.perf_counter()
        if not times and counter.total == 0:  # the first step: count what autograd saves
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                result = step()
        else:
            result = step()
        times.append(time.perf_counter() - start)
        return result

    trainer.train_step = timed
    trainer.fit()
    out = torch.tensor([counter.total, statistics.median(times[1:])], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out[0].item(), out[1].item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt_tiny.toml")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    info = init_distributed("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp, impl in ((1, "ring"), (2, "ring"), (2, "alltoall"), (4, "ring"), (4, "alltoall")):
            if info.world_size % cp:
                continue
            saved, seconds = measure(args.config, args.seq, cp, impl, args.steps, info, f"{tmp}/{cp}-{impl}")
            rows.append((cp, impl if cp > 1 else "-", saved, seconds))
    if info.rank == 0:
        print(f"{Path(args.config).stem}, one sequence of {args.seq} tokens per cp group, {info.world_size} ranks, "
              "fp32; activations: bytes autograd saves on the largest rank")
        print("| cp | attention | activations per rank (MiB) | vs CP1 | step time (s) |")
        print("|---|---|---|---|---|")
        base = rows[0][2]
        for cp, impl, saved, seconds in rows:
            print(f"| {cp} | {impl} | {saved / 2 ** 20:.1f} | {saved / base:.2f} | {seconds:.2f} |")
        times = {(cp, impl): s for cp, impl, _, s in rows}
        for cp in (2, 4):
            if (cp, "ring") in times and (cp, "alltoall") in times:
                print(f"CP{cp} step time ring / alltoall = {times[(cp, 'ring')] / times[(cp, 'alltoall')]:.2f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
