"""``parallel.engine = "deepspeed"``: DeepSpeed ZeRO 1/2/3 (and optimizer offload) for pure data parallelism.

The engine gets our model and our AdamW (param groups without decay on norms / biases / embeddings) as its
client optimizer; its ds_config is built from this config, or read from ``parallel.deepspeed_config`` with
the batch sizes, accumulation and clipping filled in from ours (a conflicting value is refused). DeepSpeed is
an optional extra: ``pip install -e '.[deepspeed]'``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.config import Config, ConfigError


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("parallel.engine = \"deepspeed\" needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    return deepspeed


def ds_config(cfg: Config, dp_size: int) -> dict:
    """The ds_config this run uses; ``parallel.deepspeed_config`` (a JSON file) is the base when given."""
    p, t = cfg.parallel, cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    base: dict = {}
    if p.deepspeed_config:
        path = Path(p.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed_config: {path} not found")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"parallel.deepspeed_config: {path} is not valid JSON ({exc.msg})") from None
        for key, value in ours.items():
            if key in base and base[key] != "auto" and base[key] != value:
                raise ConfigError(f"{path}: {key} = {base[key]} but this config gives {value}; remove it from the "
                                  "JSON or change the config")
    config = {**base, **ours}
    zero = {"stage": p.zero_stage, **base.get("zero_optimization", {})}
    if p.cpu_offload:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
    config["zero_optimization"] = zero
    config.setdefault("bf16", {"enabled": t.dtype == "bf16"})
    config.setdefault("steps_per_print", 1 << 30)
    config.setdefault("wall_clock_breakdown", False)
    return config


def initialize(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, dp_size: int):
    """-> DeepSpeed engine (call after the process group exists)."""
    deepspeed = _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # DeepSpeed would JIT-build its shared-memory all-reduce (a minute on a fresh machine); gloo suffices
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        # plain `python -m pretrain.train`: a one-process group of our own, or DeepSpeed goes looking for MPI
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, dp_size))
    return engine
