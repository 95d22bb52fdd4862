"""``parallel.engine = "deepspeed"``: the DeepSpeed engine runs backward, gradient reduction, clipping and the
optimizer step (at the accumulation boundary, inside ``engine.step()``). Its grad norm is known only after the
update, so a non-finite step cannot be skipped here (``can_skip_update``)."""

from __future__ import annotations

import torch

from pretrain.engine import Engine, Totals, objective
from pretrain.step import running


class DeepSpeedEngine(Engine):
    can_skip_update = False

    def __init__(self, cfg, parallel, task, optimizer, device, dp_size: int):
        from pretrain.parallel.deepspeed import initialize

        super().__init__(cfg, parallel, task, optimizer, device)
        self.ds = initialize(cfg, parallel.module, optimizer, dp_size)
        self.model, self.optimizer = self.ds, self.ds.optimizer
        self.checkpoint_engine = self.ds

    def forward_backward(self, micro_batches, step) -> Totals:
        totals = Totals.zeros(self.device)
        self.ds.train()
        for batch in micro_batches:
            with running(step):
                with self.autocast():
                    out = self.task.loss(self.ds, batch, accuracy=False)
                # DeepSpeed divides the loss by the accumulation steps itself: undo it, the scale is already global
                self.ds.backward(objective(out, step.scale) * self.cfg.train.grad_accum)
            self.ds.step()  # steps the optimizer at the accumulation boundary only
            totals.add(out)
        return totals

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clipped by the engine already: its global norm of this step."""
        return torch.tensor(float(self.ds.get_global_grad_norm() or 0.0))

    def step(self) -> None:
        pass  # done at the boundary inside forward_backward

    def zero_grad(self) -> None:
        pass  # the engine zeroes its own gradients after stepping
