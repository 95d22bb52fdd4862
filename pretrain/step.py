"""One optimizer step's context: what the step knows about itself, built once by the trainer and made the active
step by the engine for as long as it runs the step's forwards and backwards.

- ``count``: the targets in the whole global batch (every micro-batch of the step, summed over the ranks holding
  different tokens);
- ``grad_ranks``: those ranks (data × context parallel), over which DDP / FSDP average the gradients;
- ``scale = grad_ranks / count``: what every micro-batch's summed loss — and every MoE layer's balancing terms —
  is multiplied by before backward, so that the averaged gradient is that of the mean over the global batch;
- ``counting``: whether a forward run now is one of the step's, whose tokens MoE layers add to their loads and
  totals. The engine clears it around a pipeline schedule's shape inference; activation checkpointing clears it
  while it re-runs a block's forward during backward (``recompute_context``, torch's checkpoint ``context_fn``).

Outside a step (a module called on its own in training mode) every forward counts and the balancing terms get the
gradient 1, as if the step were that one call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    count: torch.Tensor  # float64, ≥ 0: targets of the global batch
    grad_ranks: int = 1
    counting: bool = True

    def __post_init__(self):
        self.scale = (self.grad_ranks / self.count.clamp(min=1)).float()

    @classmethod
    def plain(cls, device=None) -> StepContext:
        """A step whose gradient is the plain sum (scale 1): evaluation, or a caller normalising itself."""
        return cls(torch.ones((), dtype=torch.float64, device=device))


_active: StepContext | None = None  # not thread-local: a CUDA backward (and its recompute) runs on another thread


def active() -> StepContext | None:
    return _active


@contextlib.contextmanager
def running(step: StepContext):
    """The engine's: ``step`` is the active step for the forwards and backwards inside."""
    global _active
    before, _active = _active, step
    try:
        yield step
    finally:
        _active = before


@contextlib.contextmanager
def uncounted():
    """Forwards inside are not the step's own (shape inference, recomputation): MoE layers add nothing to their
    loads and totals. Outside a step it changes nothing."""
    step = _active
    if step is None:
        yield
        return
    before, step.counting = step.counting, False
    try:
        yield
    finally:
        step.counting = before


def counting() -> bool:
    return _active is None or _active.counting


def loss_scale(device) -> torch.Tensor:
    """The gradient of a loss term added inside the model (MoE balancing): the step's scale, 1 outside a step."""
    return (_active.scale if _active is not None else torch.ones(())).to(device)


def recompute_context():
    """``context_fn`` for ``torch.utils.checkpoint``: the first forward runs as it is, the recomputation during
    backward is not counted."""
    return contextlib.nullcontext(), uncounted()
