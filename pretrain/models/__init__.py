"""Model families. ``build_model(model_cfg)`` is the one constructor the trainer, tools and tests use."""

from __future__ import annotations

import torch.nn as nn

from pretrain.config import ModelConfig


def build_model(model_cfg: ModelConfig) -> nn.Module:
    if model_cfg.arch == "gpt":
        from pretrain.models.gpt import GPT

        return GPT(model_cfg)
    if model_cfg.arch == "bert":
        from pretrain.models.bert import BERT

        return BERT(model_cfg)
    raise ValueError(f"model.arch = {model_cfg.arch!r} is not one of gpt, bert")
