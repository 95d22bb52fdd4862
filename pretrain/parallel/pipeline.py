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

import functools

import torch
import torch.nn as nn

from pretrain.config import Config
from pretrain.distributed import local_part

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


def is_tied(cfg) -> bool:
    return cfg.arch == "bert" or cfg.tie_embeddings


def has_mtp(cfg) -> bool:
    return cfg.arch == "gpt" and cfg.mtp_depth > 0


def shares_embedding(cfg) -> bool:
    """Whether the last stage holds a copy of the token embedding: for a tied head, or for multi-token prediction,
    whose modules (on the last stage, with the head, as Megatron-LM places them) embed the tokens ahead."""
    return is_tied(cfg) or has_mtp(cfg)


def tied_weight(model: nn.Module):
    """The token embedding the last stage shares with the first (a tied head's, MTP's input), or None."""
    if not shares_embedding(model.cfg):
        return None
    if model.cfg.arch == "bert":
        return None if model.embeddings is None else model.embeddings.word_embeddings.weight
    return None if model.embed_tokens is None else model.embed_tokens.weight


def prune_to_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Keep stage ``stage``'s layers (and the embedding on the first; norm, head and the multi-token-prediction
    modules on the last). With tied embeddings or MTP the last stage keeps a copy of the token embedding (for its
    head, for MTP's inputs), under the same name; the two copies get the sum of their gradients
    (``TiedEmbeddings``), so they stay equal, as in Megatron-LM."""
    cfg = model.cfg
    first, last = stage == 0, stage == n_stages - 1
    keep = layer_ranges(cfg.n_layers, n_stages)[stage]
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    if not first:
        model.is_first_stage = False
        if cfg.arch == "bert":
            if last:  # only the word embedding, for the tied decoder
                emb = model.embeddings
                emb.position_embeddings = emb.token_type_embeddings = emb.norm = None
            else:
                model.embeddings = None
        else:
            model.embed_positions = None
            if not (last and shares_embedding(cfg)):
                model.embed_tokens = None
    if not last:
        if cfg.arch == "bert":
            model.mlm_head = model.pooler = model.nsp_head = None
        else:
            model.norm = None
            model.lm_head = None
            if has_mtp(cfg):
                model.mtp = None
    return model


class DocumentStage(nn.Module):
    """What a stage runs with packed documents (``data.document_mask``) or multi-token prediction: the first stage
    takes the task's pipeline inputs — (tokens, document ids[, positions][, MTP targets]), BERT (tokens, attention
    mask, document ids[, positions]) — and every stage but the last sends its output on with the same integer
    tensors (no gradient), as BERT's attention mask travels, so every stage's attention masks by document and the
    last stage's MTP modules read the tokens ahead. The last stage with MTP returns (logits, each depth's summed
    loss (D,), each depth's target count (D,)): what ``GPTTask.loss_from_output`` takes. ``runner``: the stage
    (wrapped, as for DDP); ``model``: the stage model (which parts it holds)."""

    def __init__(self, runner: nn.Module, model: nn.Module):
        super().__init__()
        self.runner = runner
        self.bert = model.cfg.arch == "bert"
        self.last = (model.mlm_head if self.bert else model.norm) is not None
        self.mtp = has_mtp(model.cfg)  # the inputs end with the MTP targets
        self.inferring = False  # set by the stage around the schedule's shape inference

    def forward(self, x, *rest):
        mask, docs = (rest[0], rest[1:]) if self.bert else (None, rest)
        sent = docs
        kwargs = {}
        if self.mtp:
            docs, mtp_targets = docs[:-1], docs[-1]
            if self.last and self.runner.training:  # (shape inference: any valid token ids, same shapes)
                kwargs["mtp_targets"] = torch.zeros_like(mtp_targets) if self.inferring else mtp_targets
        # the schedule's shape inference feeds a later stage uninitialised inputs: run it without documents (the
        # shapes are the same) and pass them on as they came
        used = () if self.inferring else docs
        kwargs.update(document_ids=used[0] if used else None, positions=used[1] if len(used) > 1 else None)
        out = self.runner(x, mask, **kwargs) if self.bert else self.runner(x, **kwargs)
        if self.last:
            if "mtp_targets" in kwargs:  # (logits, [(summed loss, count)] of each depth): flat tensors for the schedule
                logits, depths = out
                return logits, torch.stack([loss for loss, _ in depths]), torch.stack([n for _, n in depths])
            return out
        return (*out, *sent) if self.bert else (out, *sent)


def make_stage(module: nn.Module, stage: int, n_stages: int, device, group):
    """A ``PipelineStage`` whose shape inference — the forward the schedule runs at its first step, and after an
    evaluation, to learn the shapes it sends — is not one of the step's forwards (``step.uncounted``)."""
    return _stage_class()(module, stage, n_stages, device, group=group)


@functools.cache
def _stage_class():
    from torch.distributed.pipelining import PipelineStage

    from pretrain.step import uncounted

    if not callable(getattr(PipelineStage, "_prepare_forward_infra", None)):  # where the schedule infers shapes
        import torch

        raise RuntimeError(f"torch {torch.__version__}'s pipelining has no PipelineStage._prepare_forward_infra: "
                           "MoE statistics under pipeline parallelism would count its shape inference; use the "
                           "torch range in pyproject.toml")

    class Stage(PipelineStage):
        def _prepare_forward_infra(self, *args, **kwargs):
            inferring = hasattr(self.submod, "inferring")
            if inferring:
                self.submod.inferring = True
            try:
                with uncounted():
                    return super()._prepare_forward_infra(*args, **kwargs)
            finally:
                if inferring:
                    self.submod.inferring = False

    return Stage


def build_schedule(cfg: Config, stages: list, loss_fn):
    import torch.distributed.pipelining as pipelining

    cls = getattr(pipelining, SCHEDULES[cfg.parallel.pp_schedule])
    n_micro = cfg.parallel.n_microbatches or cfg.parallel.pp
    if cfg.parallel.pp_schedule in ("gpipe", "1f1b"):
        return cls(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_micro, loss_fn=loss_fn, scale_grads=False)


def stage_owner(stage: int, pp: int, per_rank: int, schedule: str) -> int:
    return next(r for r in range(pp) if stage in stage_ids(r, pp, per_rank, schedule))


class TiedEmbeddings:
    """Keeps the first stage's token embedding and the last stage's copy (its head) equal: their gradients are
    summed over the two owning ranks (one small group per data/tensor-parallel coordinate), and a meta-device
    initialisation is copied from the first to the last."""

    def __init__(self, mesh, parts: dict[int, nn.Module], n_stages: int, pp: int, per_rank: int, schedule: str):
        import torch.distributed as dist

        first_owner = stage_owner(0, pp, per_rank, schedule)
        last_owner = stage_owner(n_stages - 1, pp, per_rank, schedule)
        self.first = tied_weight(parts[0]) if 0 in parts else None
        self.last = tied_weight(parts[n_stages - 1]) if n_stages - 1 in parts else None
        self.group, self.src = None, None
        if first_owner != last_owner:
            rows = mesh.mesh.movedim(0, -1).reshape(-1, pp)  # every coordinate's pp ranks
            me = dist.get_rank()
            for row in rows.tolist():  # every rank creates every group, in the same order
                pair = [row[first_owner], row[last_owner]]
                group = dist.new_group(pair)
                if me in pair:
                    self.group, self.src = group, row[first_owner]

    def sync_gradients(self) -> None:
        import torch.distributed as dist

        if self.first is not None and self.last is not None:  # both stages here (the V of zbv)
            total = local_part(self.first.grad) + local_part(self.last.grad)
            local_part(self.first.grad).copy_(total)
            local_part(self.last.grad).copy_(total)
        elif self.group is not None:
            mine = self.first if self.first is not None else self.last
            dist.all_reduce(local_part(mine.grad), group=self.group)

    def sync_weights(self) -> None:
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            if self.first is not None and self.last is not None:
                local_part(self.last).copy_(local_part(self.first))
            elif self.group is not None:
                mine = self.first if self.first is not None else self.last
                dist.broadcast(local_part(mine), src=self.src, group=self.group)

    def not_counted(self) -> list:
        """The last stage's copy: the gradient norm counts the tied weight once."""
        return [self.last] if self.last is not None else []
