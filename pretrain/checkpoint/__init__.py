"""Checkpoints: ``manager.CheckpointManager`` saves and resumes runs; ``load_model`` rebuilds a model from one."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    is_complete,
    saved_config_toml,
    verify,
)
from pretrain.config import Config, config_from_toml


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a checkpoint directory (its newest complete step)."""
    path = Path(path)
    if is_complete(path):
        return path
    latest = CheckpointManager(path).latest() if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"no complete checkpoint at {path}")
    return latest


def load_model(ckpt_dir: str | Path) -> tuple[torch.nn.Module, Config]:
    """The model of a checkpoint with its resolved config, consolidated on CPU, in eval mode."""
    from pretrain.models import build_model

    path = resolve_checkpoint(ckpt_dir)
    verify(path)
    cfg = config_from_toml(saved_config_toml(path))
    model = build_model(cfg.model)
    CheckpointManager(path.parent).load(path, model, None, local=True)
    return model.eval(), cfg


__all__ = ["CheckpointError", "CheckpointManager", "load_model", "resolve_checkpoint", "verify"]
