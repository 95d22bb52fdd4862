"""One process, DDP or FSDP (with TP / SP inside): forward and backward per micro-batch, the gradient sync
deferred to the last micro-batch of the step."""

from __future__ import annotations

from pretrain.engine import Engine, Totals, objective
from pretrain.parallel.data_parallel import no_gradient_sync
from pretrain.step import running


class LocalEngine(Engine):
    def forward_backward(self, micro_batches, step) -> Totals:
        totals = Totals.zeros(self.device)
        self.model.train()
        deferred = step.grad_ranks > 1  # DDP / FSDP reduce over the gradient ranks: defer all but the last
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with running(step), no_gradient_sync(self.model, active=not last and deferred), self.loss_context():
                with self.autocast():
                    out = self.task.loss(self.model, batch, accuracy=False)
                objective(out, step.scale).backward()
            totals.add(out)
        return totals
