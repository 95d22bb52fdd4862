"""Pipeline parallelism: each trainer micro-batch goes through this rank's stages by a
``torch.distributed.pipelining`` schedule (GPipe, 1F1B, interleaved, ZBV), which splits it into the pipeline's
own micro-batches and runs their forward and backward. The engine builds the schedule around the stages with its
own loss function, which scales each pipeline micro-batch's loss by the running step's normalisation. Only last
stages see losses; the totals are summed over the pipeline group so every stage reports them."""

from __future__ import annotations

from pretrain import distributed
from pretrain.engine import Engine, Totals, objective
from pretrain.parallel.pipeline import build_schedule
from pretrain.step import StepContext, running


class PipelineEngine(Engine):
    def __init__(self, cfg, parallel, task, optimizer, device):
        super().__init__(cfg, parallel, task, optimizer, device)
        self.schedule = build_schedule(cfg, parallel.stages, self._loss)
        self._run_state: tuple[StepContext, bool, dict] | None = None  # (step, training, outputs by loss id)

    def _loss(self, output, target):
        step, train, seen = self._run_state
        out = self.task.loss_from_output(output, target, accuracy=not train)
        result = objective(out, step.scale)
        seen[id(result)] = out
        return result

    def _run(self, batch, step: StepContext, train: bool) -> Totals:
        seen: dict[int, object] = {}
        self._run_state = (step, train, seen)
        inputs, target = self.task.pipeline_io(batch)
        args = inputs if self.parallel.has_first_stage else ()
        kwargs = {"target": target} if self.parallel.has_last_stage else {}
        losses: list = []
        try:
            with running(step), self.loss_context(), self.autocast():
                if train:
                    self.schedule.step(*args, losses=losses, **kwargs)
                else:
                    self.schedule.eval(*args, losses=losses, **kwargs)
        finally:
            self._run_state = None
        totals = Totals.zeros(self.device)
        for loss in losses:  # only the micro-batches the schedule reports: shape inference calls the loss too
            totals.add(seen[id(loss)])
        return totals

    def _reduce(self, totals: Totals) -> Totals:
        """Sum over the pipeline group: the last stage has the values, the others zeros (and no extras)."""
        group = self.parallel.pp_group()
        names = sorted(set(getattr(self.task, "extra_names", ())) | set(totals.extras))
        for name in names:
            totals.extras.setdefault(name, totals.loss.new_zeros(()))
        for value in (totals.loss, totals.count, totals.correct, *(totals.extras[n] for n in names)):
            distributed.all_reduce_sum(value, group)
        return totals

    def forward_backward(self, micro_batches, step) -> Totals:
        for part in self.parallel.parts:
            part.train()
        totals = Totals.zeros(self.device)
        for batch in micro_batches:
            totals.merge(self._run(batch, step, train=True))
        return self._reduce(totals)

    def eval_batch(self, batch) -> Totals:
        return self._reduce(self._run(batch, StepContext.plain(self.device), train=False))
