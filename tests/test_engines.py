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

    cfg = tiny_config(tmp_path, "train.dtype=bf16", "train.mixed_precision=autocast", "model.d_model=64",
                      "train.micro_batch_size=2")
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


def _two_batches(trainer):
    return [{k: v for k, v in trainer.data.next_batch().items() if k in ("tokens", "targets")} for _ in range(2)]


@pytest.mark.parametrize("kernels, accum, extra", [
    ("torch", "fp32", ("model.n_kv_heads=2", "model.qkv_bias=true")),  # q/k/v of unequal widths, with biases
    ("swiglu", "fp32", ()), ("torch", "bf16", ())])
def test_bf16_weights_accumulate_bf16_gradients_into_the_fp32_parameters(tmp_path, kernels, accum, extra):
    """``train.mixed_precision = "weights"`` (the default for one process): the matmuls read bf16 copies made once
    a step; each micro-batch's bf16 weight gradient is added to an fp32 sum (2 + 4 read, 4 written a weight) or,
    with ``train.grad_accum_dtype = "bf16"``, by the GEMM itself (``addmm_``: no bytes outside the matmul), where
    autocast over fp32 weights casts each micro-batch's bf16 gradient to fp32 (2 + 4 B) and adds it to the fp32
    one (4 + 4 + 4 B). The module keeps its fp32 parameters (the optimizer's, the checkpoints'), whose
    gradients match autocast's to bf16 noise — where q, k and v run as one GEMM (of unequal widths under grouped-
    query attention, with biases), and gate and up as one into the Triton SwiGLU."""
    from pretrain.plan.step_cost import Cost, counting
    from pretrain.step import StepContext

    grads, per_micro_batch = {}, {}
    for mode in ("autocast", "weights"):
        cfg = tiny_config(tmp_path / mode, "train.dtype=bf16", f"train.mixed_precision={mode}", "model.d_model=64",
                          "train.micro_batch_size=2", f"model.kernels={kernels}", f"train.grad_accum_dtype={accum}",
                          *extra)
        trainer = build_trainer(cfg, DistInfo())
        engine = trainer.engine
        assert (engine.weights is None) == (mode == "autocast")
        params = dict(trainer.raw_model.named_parameters())
        linear = sum(m.weight.numel() for m in trainer.raw_model.modules() if isinstance(m, torch.nn.Linear))
        batches = _two_batches(trainer)

        def count(micro_batches, engine=engine):
            engine.zero_grad()
            cost = Cost()
            with counting(cost):
                engine.forward_backward(micro_batches, StepContext(torch.tensor(64.0, dtype=torch.float64)))
            return cost

        one, two = count(batches[:1]), count(batches)
        per_micro_batch[mode] = {op: (two.by_op.get(op, 0) - one.by_op.get(op, 0)) / linear
                                 for op in ("aten::_to_copy", "aten::add_", "aten::addmm_")}
        per_micro_batch[mode]["matmul"] = (two.matmul_flops - one.matmul_flops) / linear
        assert dict(trainer.raw_model.named_parameters()) == params  # the same Parameter objects, back in place
        if mode == "weights":
            fused = sorted(attribute for _, attribute, _ in engine.weights.fused)
            # per layer: q/k/v, and gate/up with the Triton SwiGLU
            assert fused == (["gate_up"] * 2 if kernels == "swiglu" else []) + ["qkv"] * 2
        assert all(getattr(m, "gate_up", None) is None and getattr(m, "qkv", None) is None
                   for m in trainer.raw_model.modules())
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params.values())
        grads[mode] = {n: p.grad.clone() for n, p in params.items()}
    casts = per_micro_batch["autocast"]["aten::_to_copy"] - per_micro_batch["weights"]["aten::_to_copy"]
    assert casts == pytest.approx(2 + 4, rel=0.05)  # the weight gradients' bf16 -> fp32 cast, gone
    adds = per_micro_batch["autocast"]["aten::add_"] - per_micro_batch["weights"]["aten::add_"]
    # fp32 sums: 2 + 4 + 4 B against autocast's 4 + 4 + 4; bf16: gone into the GEMM (the rest: equal)
    assert adds == pytest.approx(12 - 10 if accum == "fp32" else 12, rel=0.05)
    assert per_micro_batch["weights"]["aten::addmm_"] == 0  # a matmul: FLOPs, not bytes
    assert per_micro_batch["weights"]["matmul"] == pytest.approx(per_micro_batch["autocast"]["matmul"], rel=1e-6)
    for name, g in grads["autocast"].items():
        assert (grads["weights"][name] - g).norm() <= 0.02 * g.norm() + 1e-6, name


def test_bf16_weights_train_like_autocast_and_an_fp32_run_is_untouched(tmp_path):
    """50 steps of one batch, two micro-batches a step: the bf16-weights loss curve (one GEMM for gate and up,
    accumulating GEMMs) stays within 1 % of the starting loss of autocast's at every step — bf16 rounding, in
    other places, shifts the steep part of an overfitting curve by a fraction of a step (2.5 % of that step's
    loss at worst, here) — and ends within 1 %; fp32 runs never swap weights; a failing micro-batch leaves the
    fp32 parameters in place."""
    from .conftest import on_one_batch

    curves = {}
    for mode in ("autocast", "weights"):
        torch.manual_seed(0)
        cfg = tiny_config(tmp_path / mode, "train.dtype=bf16", f"train.mixed_precision={mode}", "train.steps=50",
                          "train.micro_batch_size=4", "train.grad_accum=2")
        trainer = on_one_batch(build_trainer(cfg, DistInfo()))
        trainer.fit()
        curves[mode] = trainer.losses
    assert curves["weights"][-1] < 0.5 * curves["weights"][0]  # it learns the batch
    a, b = curves["autocast"], curves["weights"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.01 * a[0] and abs(a[-1] - b[-1]) < 0.01 * a[-1]

    assert build_trainer(tiny_config(tmp_path / "fp32"), DistInfo()).engine.weights is None

    trainer = build_trainer(tiny_config(tmp_path / "fails", "train.dtype=bf16"), DistInfo())
    params = dict(trainer.raw_model.named_parameters())

    class Broken:
        def loss(self, model, batch, accuracy=False):
            model(batch["tokens"])
            raise RuntimeError("planted")

    trainer.engine.task = Broken()
    from pretrain.step import StepContext

    with pytest.raises(RuntimeError, match="planted"):
        trainer.engine.forward_backward(_two_batches(trainer), StepContext(torch.tensor(64.0, dtype=torch.float64)))
    assert dict(trainer.raw_model.named_parameters()) == params and trainer.engine.weights.copies == {}


@pytest.mark.parametrize("arch, extra", [("gpt", ()), ("bert", ()),
                                         ("gpt", ("parallel.activation_checkpointing=full",))])
def test_packed_documents_train_and_log_their_attention_density(tmp_path, arch, extra):
    """``data.document_mask`` end to end on one process: synthetic rows cut into documents (mean 4 tokens of 16)
    train, and the metrics carry ``attention_density`` — the share of the dense (causal) attention square the
    masking leaves, here well under 1 — beside the loss."""
    from pretrain.metrics import read_metrics

    cfg = tiny_config(tmp_path, "data.document_mask=true", "data.reset_positions=true", "data.synthetic_doc_len=4",
                      "logging.interval=1", "train.steps=3", *extra, arch=arch)
    trainer = build_trainer(cfg, DistInfo())
    losses = trainer.fit()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    rows = [r for r in read_metrics(cfg.logging.run_dir) if "loss" in r]
    densities = [r["attention_density"] for r in rows]
    assert len(densities) == 3 and all(0.1 < d < 0.6 for d in densities), densities
