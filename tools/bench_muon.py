#!/usr/bin/env python3
"""AdamW vs Muon on the demo corpus: gpt_tiny, the same seed, data and schedule, only the optimizer differs.

    python tools/bench_muon.py [--data data/builtin] [--steps 600] [--eval-every 50]

Prepares the demo corpus first if ``--data`` is missing (as tools/demo.sh does). Prints the validation loss of
both at every evaluation, and the first evaluated step at which Muon reaches AdamW's final validation loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(data: str, steps: int, every: int, overrides: list[str], run_dir: str) -> dict[int, float]:
    cmd = [sys.executable, "-m", "pretrain.train", "--config", "configs/gpt_tiny.toml", "--set",
           f"data.path={data}", f"train.steps={steps}", f"eval.interval={every}", "eval.steps=16",
           "checkpoint.interval=0", "logging.interval=50", "logging.tensorboard=false", f"logging.run_dir={run_dir}",
           *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/builtin")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    if not (ROOT / args.data / "manifest.json").is_file():
        subprocess.run([sys.executable, "tools/prepare_data.py", "--input", "builtin", "--output", args.data,
                        "--vocab-size", "4096", "--shard-tokens", "2000000"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        adamw = run(args.data, args.steps, args.eval_every, ["optim.name=adamw"], f"{tmp}/adamw")
        muon = run(args.data, args.steps, args.eval_every, ["optim.name=muon"], f"{tmp}/muon")
    print(f"gpt_tiny, {args.steps} steps, batch 8 × 256, lr 2e-3 cosine (Muon: the same LR, update RMS matched "
          "by 0.2·√max(m, n)), validation loss")
    print("| step | AdamW | Muon |")
    print("|---|---|---|")
    for step in sorted(adamw):
        print(f"| {step} | {adamw[step]:.4f} | {muon.get(step, float('nan')):.4f} |")
    target = adamw[max(adamw)]
    reached = [s for s in sorted(muon) if muon[s] <= target]
    print(f"AdamW's final val loss {target:.4f}: Muon reaches it at step "
          f"{reached[0] if reached else 'never'} of {args.steps}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
