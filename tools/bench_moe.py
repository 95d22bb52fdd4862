#!/usr/bin/env python3
"""MoE benchmarks on CPU.

    python tools/bench_moe.py speed [--config configs/moe_tiny.toml] [--steps 10] [--set model.n_experts=64 ...]
        tokens/s of forward + backward with the experts as one grouped GEMM (torch._grouped_mm) and as the
        per-expert loop, the same model, weights and tokens, in one run; prints both and their ratio.

    torchrun --standalone --nproc-per-node=4 tools/bench_moe.py memory [--config configs/moe_tiny.toml]
        per-rank bytes measured on the live tensors of a real training step for EP 1 / 2 / 4 under ZeRO-2 and
        ZeRO-3 (FSDP over the dp ranks, experts over ep × the remaining dp): the parameters resident at their
        peak (shards + what FSDP holds gathered after each block's forward), gradients and optimizer state
        before the second optimizer step; the largest rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from pretrain.config import load_config  # noqa: E402


def speed(config: str, steps: int, batch: int, overrides: list[str]) -> None:
    from pretrain.models import build_model
    from pretrain.models.moe import moe_layers

    cfg = load_config(config, overrides).model
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    layers = moe_layers(model)
    results = {}
    for grouped in (True, False, True, False):  # interleaved twice: the second pair is the one reported
        for layer in layers:
            layer.dispatcher.grouped = grouped
        model(tokens).float().square().mean().backward()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            model(tokens).float().square().mean().backward()
        results[grouped] = steps * tokens.numel() / (time.perf_counter() - start)
    print(f"{Path(config).stem}: {len(layers)} MoE layers × {cfg.n_experts} experts, top-{cfg.moe_top_k}, "
          f"batch {batch} × {cfg.seq_len} tokens, forward + backward, {torch.get_num_threads()} threads")
    print(f"grouped GEMM     {results[True]:10.0f} tokens/s")
    print(f"per-expert loop  {results[False]:10.0f} tokens/s")
    print(f"ratio            {results[True] / results[False]:10.2f}x")


def memory(config: str, seq_len: int) -> None:
    import torch.distributed as dist

    from pretrain.distributed import init_distributed
    from pretrain.train import build_trainer
    from tools.bench_memory import local_bytes, optimizer_tensors, param_bytes

    info = init_distributed("cpu")
    n_experts = load_config(config).model.n_experts
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (2, 3):
            for ep in (1, 2, 4):
                if info.world_size % ep or n_experts % ep:
                    continue
                cfg = load_config(config, [f"parallel.zero_stage={stage}", f"parallel.ep={ep}", "train.steps=2",
                                           "train.micro_batch_size=1", f"model.seq_len={seq_len}",
                                           "data.source=synthetic", "eval.interval=0", "checkpoint.interval=0",
                                           "checkpoint.resume=never", "logging.interval=0",
                                           "logging.tensorboard=false", f"logging.run_dir={tmp}/{stage}-{ep}",
                                           "train.device=cpu"])
                trainer = build_trainer(cfg, info)
                module, seen = trainer.raw_model, {"params": 0}

                def after_block(*_args, module=module, seen=seen):
                    seen["params"] = max(seen["params"], param_bytes(module))

                def before_step(*_args, module=module, seen=seen, trainer=trainer, **_kwargs):
                    seen["grads"] = local_bytes(p.grad for p in module.parameters())
                    seen["optimizer"] = local_bytes(optimizer_tensors(trainer.optimizer))

                for block in module.layers.values():
                    block.register_forward_hook(after_block)
                trainer.optimizer.register_step_pre_hook(before_step)
                trainer.fit()
                out = torch.tensor([seen["params"], seen["grads"], seen["optimizer"]], dtype=torch.float64)
                dist.all_reduce(out, op=dist.ReduceOp.MAX)
                rows[(stage, ep)] = out.tolist()
    if info.rank == 0:
        print(f"{Path(config).stem}, {info.world_size} ranks, largest rank, MiB")
        print("| layout | params (peak resident) | grads | optimizer state | total |")
        print("|---|---|---|---|---|")
        for (stage, ep), values in rows.items():
            mib = [v / 2 ** 20 for v in values]
            print(f"| ZeRO-{stage} EP{ep} | {mib[0]:.2f} | {mib[1]:.2f} | {mib[2]:.2f} | {sum(mib):.2f} |")
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("speed", "memory"))
    parser.add_argument("--config", default="configs/moe_tiny.toml")
    parser.add_argument("--steps", type=int, default=10, help="speed: timed iterations per mode")
    parser.add_argument("--batch", type=int, default=8, help="speed: sequences per iteration")
    parser.add_argument("--seq-len", type=int, default=64, help="memory: short sequences, the state is measured")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="speed: config overrides")
    args = parser.parse_args()
    if args.what == "speed":
        speed(args.config, args.steps, args.batch, args.set)
    else:
        memory(args.config, args.seq_len)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
