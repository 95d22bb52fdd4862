"""Checkpoints: ``manager.CheckpointManager`` saves and resumes runs; ``load_model`` rebuilds a model from one."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    saved_config_toml,
    verify,
)
from pretrain.config import Config, config_from_toml


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_checkpoint(path: str | Path, say=_stderr) -> Path:
    """A step directory (verified against its manifest), or a checkpoint directory (its newest step that
    verifies; the ones skipped are reported through ``say``). Nothing is unpickled before verification."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "manifest.json").is_file():
        verify(path)
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    found = CheckpointManager(path, clean=False).newest_verified(say)
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {path}")
    return found


def load_model(ckpt_dir: str | Path) -> tuple[torch.nn.Module, Config]:
    """The model of a checkpoint with its resolved config, consolidated on CPU, in eval mode."""
    from pretrain.models import build_model

    path = resolve_checkpoint(ckpt_dir)
    try:
        cfg = config_from_toml(saved_config_toml(path))
    except ValueError as exc:
        raise CheckpointError(f"{path / 'config.toml'}: {exc}") from None
    model = build_model(cfg.model)
    if (path / "deepspeed").is_dir():
        model.load_state_dict(_deepspeed_module_state(path, cfg))
    else:
        CheckpointManager(path.parent).load(path, model, None, local=True)
    return model.eval(), cfg


def _deepspeed_module_state(path: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint written by the DeepSpeed engine, read with ``weights_only=True`` (two of
    DeepSpeed's own plain classes allowlisted, nothing else unpickled). ZeRO 0-2: every rank's module copy is
    whole, in ``mp_rank_00_model_states.pt``. ZeRO-3: each rank's fp32 partitions are gathered back, parameter by
    parameter (DeepSpeed cuts each into ceil(numel / ranks) pieces, one per rank, in group order)."""
    state_dir = path / "deepspeed" / "state"
    if cfg.parallel.zero_stage >= 3:
        return _gather_zero3(state_dir)
    states = state_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(f"{path}: {states.name} is missing from the DeepSpeed checkpoint")
    module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in module.items()}


__all__ = ["CheckpointError", "CheckpointManager", "load_model", "resolve_checkpoint", "verify"]


def _load_deepspeed_file(file: Path, mmap: bool = False) -> dict:
    """A DeepSpeed checkpoint file with ``weights_only=True``: tensors, plain data and the plain classes DeepSpeed
    writes in them (its loss scalers, the ZeRO stage enum, the optimizer's parameter-slice records)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)


def _gather_zero3(state_dir: Path) -> dict[str, torch.Tensor]:
    optim_files = sorted(state_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                         key=lambda f: int(f.name.split("_")[3]))
    if not optim_files:
        raise CheckpointError(f"{state_dir}: no ZeRO-3 optimizer partitions found")
    shapes = _load_deepspeed_file(state_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    flat = [_load_deepspeed_file(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim_files]
    world = len(flat)
    state = {}
    for group, params in enumerate(shapes):
        offset = 0
        for name, shape in params.items():
            numel = shape.numel()
            part = -(-numel // world)
            pieces = [flat[r][group][offset:offset + part] for r in range(world)]
            state[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += part
    return state
