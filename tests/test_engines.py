"""Step engines (pretrain/engine/): a task's extra loss terms and metrics are back-propagated and logged. The
same terms under the local, pipeline and DeepSpeed engines across ranks: tests/parallel (aux_* layouts)."""

import json

import pytest
import torch

from pretrain.distributed import DistInfo
from pretrain.engine.local import LocalEngine
from pretrain.train import build_trainer

from .conftest import tiny_config
from .parallel.harness import AuxTask


def test_the_layout_picks_the_engine(tmp_path):
    trainer = build_trainer(tiny_config(tmp_path), DistInfo())
    assert isinstance(trainer.engine, LocalEngine) and trainer.engine.can_skip_update


def test_extra_terms_are_back_propagated_and_logged_per_target(tmp_path):
    cfg = tiny_config(tmp_path / "aux", "train.steps=2", "logging.interval=1", "optim.grad_clip=0")
    aux = build_trainer(cfg, DistInfo())
    aux.task = AuxTask()
    batch = aux.data.next_batch()  # what step 1 will see (the loader restarts from its state)
    aux.data.load_state_dict({"cursor": 0})
    with torch.no_grad():
        logits = aux.raw_model(batch["tokens"]).float().reshape(-1, cfg.model.vocab_size)
    keep = batch["targets"].reshape(-1) != -100
    want_z = float(1e-3 * (torch.logsumexp(logits, -1).square() * keep).sum() / keep.sum())
    want_sq = float((logits.square().mean(-1) * keep).sum() / keep.sum())
    aux.fit()
    first = json.loads((tmp_path / "aux" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["aux_zloss"] == pytest.approx(want_z, rel=1e-5)
    assert first["logit_sq"] == pytest.approx(want_sq, rel=1e-5)
    plain = build_trainer(tiny_config(tmp_path / "plain", "train.steps=2", "optim.grad_clip=0"), DistInfo())
    plain.fit()
    assert plain.losses[0] == pytest.approx(aux.losses[0], abs=1e-6)  # the logged loss is the task's own
    moved = max((a - b).abs().max().item() for a, b in zip(aux.raw_model.parameters(), plain.raw_model.parameters()))
    assert moved > 1e-6  # the extra term changed the update


def test_bf16_autocast_casts_each_weight_once_a_step_with_the_same_gradients(tmp_path):
    """The local engine enters autocast once a step: a second micro-batch adds no weight casts (the cast is
    cached across micro-batches, the backwards run outside autocast), and the gradients equal those of autocast
    entered per micro-batch — the same casts, the same values."""
    from pretrain.plan.step_cost import Cost, counting
    from pretrain.step import StepContext

    cfg = tiny_config(tmp_path, "train.dtype=bf16", "model.d_model=64", "train.micro_batch_size=2")
    trainer = build_trainer(cfg, DistInfo())
    engine = trainer.engine
    batches = [{k: v for k, v in trainer.data.next_batch().items() if k in ("tokens", "targets")} for _ in range(2)]
    weights = sum(m.weight.numel() for m in trainer.raw_model.modules() if isinstance(m, torch.nn.Linear))

    def cast_bytes(micro_batches):
        engine.zero_grad()
        cost = Cost()
        with counting(cost):
            engine.forward_backward(micro_batches, StepContext(torch.tensor(64.0, dtype=torch.float64)))
        return cost.by_op.get("aten::_to_copy", 0.0)

    one, two = cast_bytes(batches[:1]), cast_bytes(batches)
    # a micro-batch casts its activations and its weights' bf16 gradients to fp32; the step, once, the fp32
    # weights to bf16 (4 + 2 B each): what the first micro-batch casts beyond the second
    assert one - (two - one) == pytest.approx(weights * (4 + 2), rel=0.01)
    ours = {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()}

    engine.zero_grad()  # the reference: autocast per micro-batch, as before
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = engine.task.loss(engine.model, batch, accuracy=False)
        (out.loss_sum / 64.0).backward()
    for name, p in trainer.raw_model.named_parameters():
        assert torch.equal(ours[name], p.grad), name
