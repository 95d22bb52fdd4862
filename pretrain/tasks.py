"""Per-task pieces the model-agnostic trainer calls: one batch -> summed loss, counted targets, correct guesses.

Losses are summed over targets, not averaged, so the trainer can divide by the global count of the whole step
(all micro-batches, all ranks): accumulation and data parallelism then give exactly the one-big-batch gradient,
also for BERT, whose micro-batches mask different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pretrain.data.mlm import IGNORE_INDEX


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar, differentiable
    count: torch.Tensor  # number of targets the loss is summed over
    correct: torch.Tensor  # argmax == target among them
    # a task's own terms (an MoE balancing loss, ...), summed over the batch like loss_sum: back-propagated with it
    # (normalised by the same global count) and logged by name as their per-target mean; every engine carries
    # them. The task lists their names in ``extra_names`` (pipeline stages without a loss must know them).
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # statistics only, logged the same way


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, accuracy: bool = True) -> LossOutput:
    """Summed cross-entropy. Logits sharded over the vocab (a tensor-parallel head's DTensor) are never
    gathered, except to count correct guesses (evaluation only): the caller runs forward and backward inside
    ``torch.distributed.tensor.parallel.loss_parallel()`` and gets the loss as a replicated DTensor."""
    from torch.distributed.tensor import DTensor

    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    if isinstance(logits, DTensor):
        flat = logits.reshape(-1, logits.shape[-1]).float()
        loss_sum = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        full = flat.full_tensor() if accuracy else None
    else:
        full = logits.reshape(-1, logits.shape[-1]).float()
        loss_sum = F.cross_entropy(full, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = torch.zeros((), dtype=torch.long, device=targets.device)
    if accuracy:
        with torch.no_grad():
            correct = ((full.argmax(dim=-1) == targets) & keep).sum()
    return LossOutput(loss_sum, keep.sum(), correct)


DOCUMENT_KEYS = ("document_ids", "positions")  # a batch's packed documents (data.document_mask, data.reset_positions)


def documents(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for the batch's packed documents: ``document_ids`` and ``positions`` where the
    data carries them (nothing otherwise: one sequence a row)."""
    return {key: batch[key] for key in DOCUMENT_KEYS if key in batch}


def _with_density(out: LossOutput, batch: dict[str, torch.Tensor], targets: torch.Tensor, causal: bool) -> LossOutput:
    """With packed documents, ``attention_density`` among the metrics: the fraction of the dense attention square
    masking leaves to compute (FLOPs and MFU keep the dense convention), each row weighted by its targets (the
    metrics are logged per target)."""
    ids = batch.get("document_ids")
    if ids is not None:
        from pretrain.kernels.reference import attention_density

        kept = (targets != IGNORE_INDEX).sum(dim=1).to(torch.float64)
        out.metrics["attention_density"] = (attention_density(ids, causal).to(torch.float64) * kept).sum()
    return out


def _with_mtp(out: LossOutput, depths: list[tuple[torch.Tensor, torch.Tensor]], coef: float) -> LossOutput:
    """Multi-token prediction's terms: ``mtp_loss`` = coef / D · Σ_k (depth k's summed cross-entropy) joins the
    objective (normalised by the main targets' count, DeepSeek-V3's 1/T), and each depth's own loss is logged as
    ``mtp_loss_<k>`` (a metric: its sum over the main targets' count, as the main loss)."""
    total = sum(loss for loss, _ in depths)
    out.extra_losses["mtp_loss"] = total * (coef / len(depths))
    for k, (loss, _) in enumerate(depths, 1):
        out.metrics[f"mtp_loss_{k}"] = loss.detach()
    return out


class GPTTask:
    """Next-token prediction: batch {"tokens", "targets"} (B, T), with "document_ids" / "positions" (B, T) where
    the data packs documents apart (``data.document_mask``)."""

    extra_names: tuple[str, ...] = ()

    def __init__(self, mtp_depth: int = 0, mtp_loss_coef: float = 0.0):
        """``mtp_depth``, ``mtp_loss_coef``: the model's multi-token prediction, for the pipeline's last stage (its
        terms' names, which every stage reports, and the coefficient ``loss_from_output`` applies)."""
        self.mtp_depth, self.mtp_loss_coef = mtp_depth, mtp_loss_coef
        if mtp_depth:
            self.extra_names = ("mtp_loss", *(f"mtp_loss_{k}" for k in range(1, mtp_depth + 1)))

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["targets"] != IGNORE_INDEX).sum()

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], accuracy: bool = True) -> LossOutput:
        inner = getattr(model, "module", model)  # DDP / DeepSpeed wrap the model
        # multi-token prediction while training (model.mtp_depth): the model also returns each depth's summed loss
        mtp = getattr(inner, "mtp", None) is not None and inner.training
        # (the whole sequence's targets under context parallelism: Parallelized.split_batch)
        extra = {"mtp_targets": batch.get("mtp_targets", batch["targets"])} if mtp else {}
        if not accuracy and "cross_entropy" in getattr(getattr(inner, "ops", None), "triton", ()):
            # the fused linear cross-entropy: the model returns the mean loss, never the (tokens, vocab) logits
            count = (batch["targets"] != IGNORE_INDEX).sum()
            result = model(batch["tokens"], targets=batch["targets"], **documents(batch), **extra)
            mean, depths = result if mtp else (result, None)
            out = LossOutput(mean * count, count, torch.zeros((), dtype=torch.long, device=count.device))
        else:
            result = model(batch["tokens"], **documents(batch), **extra)
            logits, depths = result if mtp else (result, None)
            out = _cross_entropy(logits, batch["targets"], accuracy)
        if depths is not None:
            _with_mtp(out, depths, inner.cfg.mtp_loss_coef)
        return _with_density(out, batch, batch["targets"], causal=True)

    def pipeline_io(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(first stage inputs, last stage target) of a batch; packed documents' ids and positions travel too, and
        with multi-token prediction the targets, which the last stage's MTP modules embed
        (``parallel/pipeline.py``: ``DocumentStage``)."""
        mtp = (batch.get("mtp_targets", batch["targets"]),) if self.mtp_depth else ()
        return (batch["tokens"], *documents(batch).values(), *mtp), batch["targets"]

    def loss_from_output(self, output, targets: torch.Tensor, accuracy: bool = True) -> LossOutput:
        """The last pipeline stage's output: logits, or with multi-token prediction while training (logits, each
        depth's summed loss (D,), each depth's target count (D,))."""
        if isinstance(output, tuple):
            logits, losses, counts = output
            out = _cross_entropy(logits, targets, accuracy)
            return _with_mtp(out, list(zip(losses.unbind(), counts.unbind())), self.mtp_loss_coef)
        return _cross_entropy(output, targets, accuracy)


class BERTTask:
    """Masked-LM: batch {"tokens", "attention_mask", "labels"} (B, T); labels -100 except at masked positions.

    With sentence pairs the batch also holds "token_type_ids" (B, T) and "nsp_labels" (B,): the NSP / SOP loss
    is added as a mean over the micro-batch's pairs, scaled to the masked-token count so that the trainer's
    division by the global count leaves ``mean MLM + mean NSP`` (Devlin et al.'s sum of the two means).
    """

    extra_names: tuple[str, ...] = ()

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    @staticmethod
    def pipeline_io(batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(first stage inputs, last stage target); the attention mask travels along the stages (and packed
        documents' ids and positions)."""
        return (batch["tokens"], batch["attention_mask"], *documents(batch).values()), batch["labels"]

    @staticmethod
    def loss_from_output(logits: torch.Tensor, labels: torch.Tensor, accuracy: bool = True) -> LossOutput:
        return _cross_entropy(logits, labels, accuracy)

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], accuracy: bool = True) -> LossOutput:
        if "nsp_labels" not in batch:
            out = _cross_entropy(model(batch["tokens"], batch["attention_mask"], **documents(batch)), batch["labels"],
                                 accuracy)
            return _with_density(out, batch, batch["labels"], causal=False)
        mlm_logits, nsp_logits = model(batch["tokens"], batch["attention_mask"], batch["token_type_ids"],
                                       with_nsp=True, **documents(batch))
        out = _cross_entropy(mlm_logits, batch["labels"], accuracy)
        nsp = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"], ignore_index=IGNORE_INDEX)
        if torch.isfinite(nsp):  # NaN when every pair of the micro-batch is masked out
            out.loss_sum = out.loss_sum + nsp * out.count
        return _with_density(out, batch, batch["labels"], causal=False)


def task_for(arch: str, model=None):
    """The task of a model family (``model``: its ModelConfig, for GPT's multi-token prediction). MoE layers need
    nothing of the task: their balancing losses enter the backward inside the layers (``models/moe.py``), their
    statistics go through the ``MoEBalance`` callback."""
    if arch == "gpt" and model is not None:
        return GPTTask(model.mtp_depth, model.mtp_loss_coef)
    return {"gpt": GPTTask, "bert": BERTTask}[arch]()
