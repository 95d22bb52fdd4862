"""Pipeline parallelism: each trainer micro-batch goes through this rank's stages by a
``torch.distributed.pipelining`` schedule (GPipe, 1F1B, interleaved, ZBV), which splits it into the pipeline's
own micro-batches and runs their forward and backward. The engine builds the schedule around the stages with its
own loss function, which scales each pipeline micro-batch's loss by the running step's normalisation. Only last
stages see losses; the totals are summed over the pipeline group so every stage reports them."""

from __future__ import annotations

import torch

from pretrain import distributed
from pretrain.engine import Engine, Totals, objective
from pretrain.parallel.pipeline import build_schedule
from pretrain.step import StepContext, running


class PipelineEngine(Engine):
    def __init__(self, cfg, parallel, task, optimizer, device):
        super().__init__(cfg, parallel, task, optimizer, device)
        self.schedule = build_schedule(cfg, parallel.stages, self._loss)
        self._run_state: tuple[StepContext, bool, dict] | None = None  # (step, training, outputs by loss id)
        self._scoring: list | None = None  # per-token scores of the micro-batches, while per_token runs

    def _loss(self, output, target):
        if self._scoring is not None:  # downstream scoring: per-token scores of this pipeline micro-batch
            from pretrain.downstream import token_scores

            output = output[0] if isinstance(output, tuple) else output  # (logits, MTP terms) while training
            whole = output.full_tensor() if hasattr(output, "full_tensor") else output
            self._scoring.append(token_scores(whole, target))
            return (output.sum() * 0).float()
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

    def per_token(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Downstream scoring through the pipeline (``pretrain/downstream.py``): the last stage scores each target
        token (log-probability, whether it is the argmax); summed over the pipeline group, every stage holds them."""
        self._scoring = []
        args = self.task.pipeline_io({"tokens": tokens, "targets": targets})[0] if self.parallel.has_first_stage else ()
        kwargs = {"target": targets} if self.parallel.has_last_stage else {}
        try:
            with self.loss_context():
                self.schedule.eval(*args, losses=[], **kwargs)
            parts = self._scoring
        finally:
            self._scoring = None
        whole = torch.zeros(2, *tokens.shape, dtype=torch.float64, device=tokens.device)
        if parts:
            whole[0] = torch.cat([logprob for logprob, _ in parts])
            whole[1] = torch.cat([hit for _, hit in parts]).double()
        distributed.all_reduce_sum(whole, self.parallel.pp_group())
        return whole[0], whole[1] > 0.5

    def forward_backward(self, micro_batches, step) -> Totals:
        for part in self.parallel.parts:
            part.train()
        totals = Totals.zeros(self.device)
        for batch in micro_batches:
            totals.merge(self._run(batch, step, train=True))
        return self._reduce(totals)

    def eval_batch(self, batch) -> Totals:
        return self._reduce(self._run(batch, StepContext.plain(self.device), train=False))
