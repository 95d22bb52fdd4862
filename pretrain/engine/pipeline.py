"""Pipeline parallelism: each trainer micro-batch goes through this rank's stages by a
``torch.distributed.pipelining`` schedule (GPipe, 1F1B, interleaved, ZBV), which splits it into the pipeline's
own micro-batches and runs their forward and backward. Only last stages see losses; the totals are summed over
the pipeline group so every stage reports them."""

from __future__ import annotations

from pretrain import distributed
from pretrain.engine import Engine, Totals, objective


class PipelineEngine(Engine):
    def _run(self, batch, scale, train: bool) -> Totals:
        seen: dict[int, object] = {}

        def loss_fn(output, target):
            out = self.task.loss_from_output(output, target, accuracy=not train)
            result = objective(out, scale)
            seen[id(result)] = out
            return result

        self.parallel.pipeline_loss.fn = loss_fn
        inputs, target = self.task.pipeline_io(batch)
        args = inputs if self.parallel.has_first_stage else ()
        kwargs = {"target": target} if self.parallel.has_last_stage else {}
        losses: list = []
        with self.loss_context(), self.autocast():
            if train:
                self.parallel.schedule.step(*args, losses=losses, **kwargs)
            else:
                self.parallel.schedule.eval(*args, losses=losses, **kwargs)
        totals = Totals.zeros(self.device)
        for loss in losses:  # only the micro-batches the schedule reports: shape inference calls loss_fn too
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

    def forward_backward(self, micro_batches, scale) -> Totals:
        for part in self.parallel.parts:
            part.train()
        totals = Totals.zeros(self.device)
        for batch in micro_batches:
            totals.merge(self._run(batch, scale, train=True))
        return self._reduce(totals)

    def eval_batch(self, batch) -> Totals:
        return self._reduce(self._run(batch, 1.0, train=False))
