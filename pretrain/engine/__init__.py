"""Step engines: how one optimizer step runs for a parallel layout. The trainer keeps the loop (schedule, cadence,
signals, the non-finite guard, metrics) and hands each step's micro-batches to the engine chosen here, once.

Every engine takes the step's micro-batches and its :class:`~pretrain.step.StepContext` (the global target count,
the gradient ranks, ``scale`` = gradient ranks / targets in the whole global batch), makes it the active step
while it runs them (``step.running``: MoE layers read the scale and whether a forward counts from it) and returns :class:`Totals` — the summed loss, target count, correct guesses and the
task's extra terms (``LossOutput.extra_losses``, added to what is back-propagated, and ``LossOutput.metrics``),
all as this rank's float64 sums — and owns its backward and optimizer step:

- ``local``: one process, DDP or FSDP (and TP / SP inside them): forward + backward per micro-batch, gradient sync
  only on the last one;
- ``pipeline``: ``torch.distributed.pipelining`` schedules over this rank's stages;
- ``deepspeed``: the DeepSpeed engine, which also clips and steps inside its backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from pretrain.config import Config
from pretrain.distributed import whole
from pretrain.parallel.data_parallel import clip_grad_norm
from pretrain.step import StepContext


@dataclass
class Totals:
    loss: torch.Tensor  # float64 sums over this rank's micro-batches
    count: torch.Tensor
    correct: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(cls, device) -> Totals:
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(zero(), zero(), zero())

    def add(self, out) -> None:
        """Fold one micro-batch's LossOutput in (replicated DTensors, as under loss_parallel, made plain)."""
        self.merge(Totals(*(whole(v).detach().to(torch.float64) for v in (out.loss_sum, out.count, out.correct)),
                          {n: whole(v).detach().to(torch.float64) for n, v in {**out.extra_losses,
                                                                               **out.metrics}.items()}))

    def merge(self, other: Totals) -> None:
        self.loss += other.loss
        self.count += other.count
        self.correct += other.correct
        for name, value in other.extras.items():
            self.extras[name] = self.extras[name] + value if name in self.extras else value


def objective(out, scale) -> torch.Tensor:
    """What one micro-batch back-propagates: its summed loss plus the task's extra terms, globally normalised."""
    total = out.loss_sum
    for term in out.extra_losses.values():
        total = total + term
    return total * scale


class Engine:
    """The local engine's shape, which the others follow. ``model`` runs forward and backward, ``module`` is what
    the optimizer, checkpoints and evaluation see; ``checkpoint_engine`` is handed to the checkpoint manager
    (DeepSpeed writes its own files); ``can_skip_update`` says whether a non-finite step can still be skipped
    (DeepSpeed has stepped by the time the loss is known)."""

    checkpoint_engine = None
    can_skip_update = True

    def __init__(self, cfg: Config, parallel, task, optimizer: torch.optim.Optimizer, device: torch.device):
        self.cfg, self.parallel, self.task, self.optimizer, self.device = cfg, parallel, task, optimizer, device
        self.model, self.module = parallel.model, parallel.module

    # shared pieces -------------------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def outside_autocast(self):
        """A backward inside a step's ``autocast`` runs without it (as torch recommends), while the enclosing
        context keeps its cache of cast weights: entered again for the next micro-batch, autocast would cast
        every fp32 weight anew (torch clears the cache when the outermost autocast exits)."""
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    def loss_context(self):
        """``loss_parallel`` around forward and backward when the head's logits are sharded over the vocab."""
        m = self.cfg.model
        if self.parallel.dims.tp > 1 and m.arch == "gpt" and not m.tie_embeddings:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    # the step ------------------------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[dict], step: StepContext) -> Totals:
        raise NotImplementedError

    def clip(self, max_norm: float) -> torch.Tensor:
        """Sync tied gradients, clip by the global norm (counted once over every shard); returns the norm."""
        tied = self.parallel.tied
        if tied is not None:
            tied.sync_gradients()
        return clip_grad_norm(list(self.module.parameters()), max_norm, self.parallel.pp_group(),
                              tied.not_counted() if tied is not None else ())

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # evaluation ----------------------------------------------------------------------------------------------
    def eval_batch(self, batch: dict) -> Totals:
        totals = Totals.zeros(self.device)
        with self.autocast(), self.loss_context():
            out = self.task.loss(self.module, batch, accuracy=True)
        totals.add(out)
        return totals

    def eval_mode(self) -> None:
        for part in self.parallel.parts or [self.module]:
            part.eval()


def build_engine(cfg: Config, parallel, task, optimizer, device: torch.device, dp_size: int) -> Engine:
    """The engine for this layout: chosen once, never branched on again."""
    if cfg.parallel.engine == "deepspeed":
        from pretrain.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, parallel, task, optimizer, device, dp_size)
    if parallel.stages:
        from pretrain.engine.pipeline import PipelineEngine

        return PipelineEngine(cfg, parallel, task, optimizer, device)
    from pretrain.engine.local import LocalEngine

    return LocalEngine(cfg, parallel, task, optimizer, device)
