"""What ``pretrain.train --check`` (run by the SLURM scripts before ``srun``) says of memory: the predicted bytes
per GPU, and a refusal — with the best layout that fits — when they exceed the GPU."""

from __future__ import annotations

import subprocess

from pretrain.config import Config
from pretrain.plan.hardware import GPU, gpu
from pretrain.plan.memory import Memory, estimate_memory

GIB = 2**30


def this_gpu(cfg: Config) -> GPU | None:
    """``plan.gpu`` if set, else the GPU of this machine (torch, then nvidia-smi), else None."""
    if cfg.plan.gpu:
        return gpu(cfg.plan.gpu)
    name = None
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA setup is not this check's business
        name = None
    if name is None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.strip().splitlines()
            name = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            name = None
    if name is None:
        return None
    try:
        return gpu(name)
    except ValueError:
        return None


def summary(mem: Memory) -> str:
    g = lambda b: f"{b / GIB:.2f}"
    return (f"{g(mem.total_bytes)} GiB (params {g(mem.params_bytes)}, grads {g(mem.grads_bytes)}, optimizer "
            f"{g(mem.optimizer_bytes)}, activations {g(mem.activations_bytes)}, logits {g(mem.logits_bytes)}, "
            f"recompute {g(mem.detail.get('recompute_bytes', 0))}, communication {g(mem.comm_bytes)}"
            + (f", bf16 weight copies {g(mem.detail['weight_copies_bytes'])}" if mem.detail.get("weight_copies_bytes")
               else "") + ")")


def check(cfg: Config, world: int) -> tuple[str, str | None]:
    """(the line to print, an error line or None). The error names the best fitting layout's overrides; a
    ``train.fp8`` that would convert no layer is the trainer's own line."""
    if cfg.train.fp8 != "none":
        from pretrain.parallel.fp8 import convertible_count, converts_nothing

        why = converts_nothing(cfg, convertible_count(cfg))
        if why:
            return "", why
    mem = estimate_memory(cfg, world)
    if cfg.parallel.engine == "deepspeed":  # its flat buffers are its own: an estimate, never a refusal
        return (f"predicted memory per GPU (as the native engine; DeepSpeed's buffers differ): {summary(mem)}",
                None)
    device = this_gpu(cfg)
    if device is None:
        return f"predicted memory per GPU: {summary(mem)}; no GPU type known (set plan.gpu to check the fit)", None
    budget = device.hbm_gib * GIB * cfg.plan.usable_fraction
    line = (f"predicted memory per GPU: {summary(mem)} of {device.name}'s {device.hbm_gib:g} GiB "
            f"({cfg.plan.usable_fraction:.0%} usable)")
    if mem.total_bytes <= budget or cfg.plan.force:
        return line, None
    from pretrain.plan.search import minimal_overrides, search

    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len * _dp(cfg, world)
    print("predicted not to fit: searching for a layout that does ...", flush=True)
    options, _ = search(cfg, world, device, tokens, top=1)
    if options:
        best = options[0]
        hint = (f"the best layout that fits: --set {' '.join(minimal_overrides(best, cfg))} (predicted "
                f"{best.memory.total_bytes / GIB:.1f} GiB, {best.speed.tokens_per_s:,.0f} tokens/s)")
    else:
        hint = f"no layout of {world} GPUs fits: more GPUs or a smaller model"
    return line, (f"predicted {mem.total_bytes / GIB:.1f} GiB per GPU does not fit the {device.name} "
                  f"({budget / GIB:.1f} GiB usable); {hint}; or --set plan.force=true to launch anyway")


def _dp(cfg: Config, world: int) -> int:
    from pretrain.parallel.dims import ParallelDims

    return ParallelDims.from_config(cfg, world).dp
