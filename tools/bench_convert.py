#!/usr/bin/env python3
"""Checkpoint costs: wall time and peak RSS of ``tools/convert_checkpoint.py --to hf`` on a random-init model
(default gpt_1b) against the bytes of its weights; and how long a training step stalls on a synchronous save
versus an asynchronous one (default gpt_125m, model + AdamW state).

    python tools/bench_convert.py [--config configs/gpt_1b.toml] [--save-config configs/gpt_125m.toml]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt_1b.toml")
    parser.add_argument("--save-config", default="configs/gpt_125m.toml")
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    # the checkpoint is made in a child process so this one's RSS stays small
    make = ("import sys, torch; sys.path.insert(0, '.');"
            "from pretrain.config import load_config; from pretrain.models import build_model;"
            "from pretrain.checkpoint.hf import save_native;"
            f"cfg = load_config({args.config!r}); torch.manual_seed(0);"
            "m = build_model(cfg.model);"
            f"save_native(m, cfg.model, {str(work / 'native')!r});"
            "print(sum(p.numel() * p.element_size() for p in m.parameters()))")
    weight_bytes = int(subprocess.run([sys.executable, "-c", make], check=True, capture_output=True,
                                      text=True).stdout.split()[-1])
    # a wrapper process whose only child is the conversion, so its children's peak RSS is the conversion's
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter();"
               f"subprocess.run([sys.executable, 'tools/convert_checkpoint.py', '--to', 'hf', '--input',"
               f" {str(work / 'native')!r}, '--output', {str(work / 'hf')!r}], check=True, capture_output=True);"
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    seconds, peak = (float(x) for x in subprocess.run([sys.executable, "-c", wrapper], check=True,
                                                       capture_output=True, text=True).stdout.split())
    print(f"{Path(args.config).stem}: weights {weight_bytes / 2 ** 30:.2f} GiB; conversion {seconds:.1f} s, "
          f"peak RSS {peak / 2 ** 30:.2f} GiB = {peak / weight_bytes:.2f}x the weights")
    shutil.rmtree(work, ignore_errors=True)
    save_stall(args.save_config, work)
    return 0


def save_stall(config: str, work: Path) -> None:
    import time

    import torch

    from pretrain.checkpoint.manager import CheckpointManager
    from pretrain.config import load_config
    from pretrain.models import build_model

    cfg = load_config(config)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # optimizer state exists
    manager = CheckpointManager(work / "saves")
    stalls = {}
    for mode in (False, True):
        start = time.perf_counter()
        manager.save(1 + mode, model, optimizer, {}, cfg.to_toml(), async_save=mode)
        stalls[mode] = time.perf_counter() - start
        finish = time.perf_counter()
        manager.wait()
        if mode:
            stalls["background"] = time.perf_counter() - finish
    print(f"{Path(config).stem} save (model + AdamW state): training stalls {stalls[False]:.2f} s sync, "
          f"{stalls[True]:.2f} s async (then {stalls['background']:.2f} s of writing in the background)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
