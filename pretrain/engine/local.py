"""One process, DDP or FSDP (with TP / SP inside): forward and backward per micro-batch, the gradient sync
deferred to the last micro-batch of the step. bf16 autocast is entered once for the whole step (the backward of
each micro-batch outside it), so its cache casts each fp32 weight once a step instead of once a micro-batch; where
``parallel/mixed_precision.py`` applies (one process, DDP) the matmuls read bf16 copies of the weights made once a
step, whose gradients accumulate in bf16 and reach the fp32 parameters once, after the last micro-batch."""

from __future__ import annotations

import contextlib

from pretrain.engine import Engine, Totals, objective
from pretrain.parallel.data_parallel import no_gradient_sync
from pretrain.parallel.mixed_precision import ComputeWeights
from pretrain.step import running


class LocalEngine(Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = ComputeWeights.for_layout(self.cfg, self.parallel)

    def forward_backward(self, micro_batches, step) -> Totals:
        totals = Totals.zeros(self.device)
        self.model.train()
        deferred = step.grad_ranks > 1  # DDP / FSDP reduce over the gradient ranks: defer all but the last
        own_sync = self.weights is not None and self.weights.syncs_gradients  # DDP's reduction is the copies'
        weights = self.weights.step() if self.weights is not None else contextlib.nullcontext()
        with running(step), weights, self.autocast():  # once a step: each weight is cast once, not per micro-batch
            for i, batch in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with no_gradient_sync(self.model, active=(not last and deferred) or own_sync), self.loss_context():
                    out = self.task.loss(self.model, batch, accuracy=False)
                    with self.outside_autocast():
                        objective(out, step.scale).backward()
                totals.add(out)
        return totals
