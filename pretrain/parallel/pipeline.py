"""Pipeline parallelism with ``torch.distributed.pipelining``: stages by layer, schedules from config.

The model's layers are split evenly (earlier stages take the remainder) into ``pp × stages_per_rank`` stages;
the first stage also holds the embedding, the last the final norm, the head and the loss. A stage is the same
model class with the other layers deleted and the embedding / norm / head set to None, so parameter names stay
those of the whole model (checkpoints and conversion do not see the pipeline).

Schedules: ``gpipe`` (all forwards, then all backwards), ``1f1b`` (one forward one backward in the steady state,
Narayanan et al. 2021), ``interleaved_1f1b`` (``stages_per_rank`` virtual stages per rank, looped placement:
rank r holds stages r, r + pp, ...), ``zbv`` (zero-bubble V schedule, Qi et al. 2024: two stages per rank in a V,
rank r holds r and 2·pp - 1 - r). Each micro-batch of the trainer is cut into ``n_microbatches`` (default pp).
Gradients are not rescaled by the schedule: the loss function already carries the step's global normalisation.
"""

from __future__ import annotations

import torch.nn as nn

from pretrain.config import Config

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
             "zbv": "ScheduleZBVZeroBubble"}


def stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(per_rank)]


def layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def prune_to_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Keep stage ``stage``'s layers (and the embedding on the first, norm + head on the last)."""
    keep = layer_ranges(model.cfg.n_layers, n_stages)[stage]
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    if stage != 0:
        model.embed_tokens = None
        model.embed_positions = None
    if stage != n_stages - 1:
        model.norm = None
        model.lm_head = None
    return model


def build_schedule(cfg: Config, stages: list, loss_fn):
    import torch.distributed.pipelining as pipelining

    cls = getattr(pipelining, SCHEDULES[cfg.parallel.pp_schedule])
    n_micro = cfg.parallel.n_microbatches or cfg.parallel.pp
    if cfg.parallel.pp_schedule in ("gpipe", "1f1b"):
        return cls(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_micro, loss_fn=loss_fn, scale_grads=False)
