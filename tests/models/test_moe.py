"""MoE layers (pretrain/models/moe.py): routing math, dropless dispatch, grouped GEMM against the per-expert loop,
balancing terms, the aux-loss-free bias, active-parameter FLOPs, a MoE GPT that trains, and bad configs."""

import json

import pytest
import torch

from pretrain.callbacks import Callback
from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistInfo
from pretrain.models import build_model
from pretrain.models.flops import matmul_params, num_params
from pretrain.models.moe import route, update_router_bias
from pretrain.parallel.dims import ParallelDims
from pretrain.train import build_trainer

from ..conftest import TINY_MODEL, on_one_batch, tiny_config

MOE = ["model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=48"]


def moe_cfg(*extra):
    return load_config(None, [*TINY_MODEL, *MOE, *extra]).model


def layer(*extra, seed=0):
    torch.manual_seed(seed)
    model = build_model(moe_cfg(*extra))
    return model.layers["1"].mlp


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_dropless_routes_every_token_to_k_distinct_experts_with_normalised_weights(router):
    moe = layer(f"model.moe_router={router}")
    x = torch.randn(3, 37, 32)
    weights, chosen, scores, _ = moe.gate(x.reshape(-1, 32))
    assert chosen.shape == (111, 2) and all(len(set(row)) == 2 for row in chosen.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(111))
    assert torch.equal(torch.topk(scores, 2).indices.sort(-1).values, chosen.sort(-1).values)
    token, weight, counts, routed, dropped = route(chosen, weights, 4, capacity=0)
    y = moe.dispatcher(x.reshape(-1, 32), token, counts, moe.experts)
    assert int(counts.sum()) == 111 * 2 and y.shape == (222, 32) and int(dropped) == 0  # every token to k experts
    assert counts.tolist() == routed.tolist() == torch.bincount(chosen.flatten(), minlength=4).tolist()
    assert sorted(token.tolist()) == sorted(list(range(111)) * 2)


def test_grouped_gemm_equals_the_per_expert_loop_forward_and_backward():
    moe = layer("model.n_shared_experts=1")
    x = torch.randn(2, 29, 32, requires_grad=True)
    outs, grads = [], []
    for grouped in (True, False):
        moe.dispatcher.grouped = grouped
        moe.zero_grad()
        x.grad = None
        y = moe(x)
        (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_layer_equals_its_definition_token_by_token():
    moe = layer("model.moe_router=sigmoid", "model.n_shared_experts=1")
    x = torch.randn(1, 9, 32)
    y = moe(x)[0]
    w = moe.gate.weight
    for t in range(9):
        scores = torch.sigmoid(w @ x[0, t])
        top = torch.topk(scores, 2).indices
        want = moe.shared_experts(x[0, t])
        for e, s in zip(top.tolist(), (scores[top] / scores[top].sum()).tolist()):
            gate, up = (moe.experts.gate_up_proj[e] @ x[0, t]).split(48)
            want = want + s * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(y[t], want, atol=1e-5, rtol=1e-5)


def aux_mean(moe, x):
    moe.train()
    moe.clear_step()
    moe(x)
    return float(moe.totals[0] / moe.totals[2])


def test_aux_loss_is_one_when_uniform_and_two_when_two_experts_take_everything():
    moe = layer()
    with torch.no_grad():
        moe.gate.weight.zero_()  # every score equal (P uniform): E·Σ f·P = 1 whatever the picks
    assert aux_mean(moe, torch.randn(1, 16, 32)) == pytest.approx(1.0)
    assert sorted(moe.load.tolist()) == [0, 0, 16, 16]  # experts 0 and 1 took every slot
    with torch.no_grad():  # experts 0 and 1 get all the probability and all the tokens: 4·(½·½ + ½·½) = 2
        moe.gate.weight.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None].expand(4, 32))
    assert aux_mean(moe, torch.rand(1, 16, 32) + 1.0) == pytest.approx(2.0, rel=1e-3)


def test_sequence_aux_loss_does_not_depend_on_how_the_batch_is_split():
    x = torch.randn(4, 16, 32)
    per_sequence = layer()
    whole = aux_mean(per_sequence, x)
    parts = [aux_mean(per_sequence, x[i:i + 1]) for i in range(4)]
    assert whole == pytest.approx(sum(parts) / 4, rel=1e-6)
    batch_wide = layer("model.moe_aux_scope=micro_batch")
    assert aux_mean(batch_wide, x) != pytest.approx(whole, rel=1e-4)  # f and P over all 64 tokens instead


def test_capacity_drops_the_slots_over_it_latest_tokens_first_and_counts_them():
    moe = layer("model.moe_capacity_factor=1.0")
    with torch.no_grad():
        moe.gate.weight.zero_()  # equal scores: two experts take every slot, 16 each
    x = torch.randn(1, 16, 32)
    assert moe.capacity(16) == 8  # ceil(1.0 · 16 · 2 / 4)
    weights, chosen, _, _ = moe.gate(x.reshape(-1, 32))
    token, weight, counts, routed, dropped = route(chosen, weights, 4, capacity=8)
    assert sorted(routed.tolist()) == [0, 0, 16, 16] and sorted(counts.tolist()) == [0, 0, 8, 8]
    assert int(dropped) == 16
    assert token.tolist() == list(range(8)) * 2  # each expert kept its first 8 tokens
    moe.train()
    moe.clear_step()
    y = moe(x)
    assert float(moe.totals[3]) == 16
    dropless = layer()
    with torch.no_grad():
        dropless.gate.weight.zero_()
    full = dropless(x)
    torch.testing.assert_close(y[0, :8], full[0, :8])  # kept tokens: both experts, as without capacity
    assert y[0, 8:].abs().max() == 0  # dropped tokens: nothing (no shared expert here; the residual carries them)


class Grab(Callback):
    """Each step's MoE loads and totals, read before MoEBalance clears them."""

    def __init__(self):
        self.seen = []

    def step_end(self, trainer):
        self.seen.append([torch.cat([m.load, m.totals]) for m in trainer.moe_layers])


def test_activation_checkpointing_counts_each_token_once(tmp_path):
    """The recomputation during backward is not counted again — also when it runs the whole block (torch stops a
    recomputation early once it has the saved tensors it needs, which may or may not reach the counting)."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    loads = []
    for ac, early_stop in (("none", True), ("full", True), ("full", False)):
        cfg = tiny_config(tmp_path / f"{ac}{early_stop}", *MOE, "train.steps=1",
                          f"parallel.activation_checkpointing={ac}")
        trainer = build_trainer(cfg, DistInfo())
        grab = Grab()
        trainer.callbacks.insert(0, grab)
        with set_checkpoint_early_stop(early_stop):
            trainer.fit()
        loads.append(grab.seen[0])
    for other in loads[1:]:
        for a, b in zip(loads[0], other):
            torch.testing.assert_close(a, b)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len
    assert float(loads[0][0][-2]) == tokens  # the step's tokens, once
    assert float(loads[0][0][:4].sum()) == 2 * tokens


def test_bias_moves_selection_towards_idle_experts():
    moe = layer("model.moe_balance=bias")
    moe.train()
    with torch.no_grad():
        moe.gate.weight.zero_()
    moe(torch.randn(1, 16, 32))
    load = moe.load.clone()
    busy = {e for e, n in enumerate(load.tolist()) if n}
    assert sorted(load.tolist()) == [0, 0, 16, 16] and len(busy) == 2  # equal scores: two experts take all
    update_router_bias(moe, load, 0.01)
    assert moe.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01 if e in busy else 0.01 for e in range(4)])
    weights, chosen, _, _ = moe.gate(torch.randn(5, 32))
    assert set(chosen.flatten().tolist()) == set(range(4)) - busy  # selection follows the bias
    torch.testing.assert_close(weights, torch.full((5, 2), 0.5))  # the weights do not


def test_active_parameters_for_flops():
    cfg = moe_cfg("model.n_shared_experts=1", "model.moe_dense_layers=1")
    model = build_model(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    dense = moe_cfg("model.n_experts=0")
    per_token_moe = 32 * 4 + 3 * 32 * 48 * (2 + 1)  # router + k experts + shared, one MoE layer
    assert matmul_params(cfg) == matmul_params(dense) - 3 * 32 * dense.ffn_dim + per_token_moe


def test_moe_gpt_trains_and_logs_its_balancing_terms(tmp_path):
    cfg = tiny_config(tmp_path, *MOE, "model.moe_balance=both", "train.steps=40", "logging.interval=10",
                      "schedule.warmup_steps=2", "optim.weight_decay=0")
    trainer = build_trainer(cfg, DistInfo())
    on_one_batch(trainer)
    losses = trainer.fit()
    assert losses[0] > 3.5 and losses[-1] < 1.5, (losses[0], losses[-1])
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["moe_aux_loss"] > 0 and record["moe_z_loss"] > 0 and record["moe_max_load"] >= 1.0
        assert record["moe_max_load.1"] >= 1.0 and record["moe_dropped"] == 0
        assert record["moe_bias_min"] < 0 < record["moe_bias_max"]
    biases = [m.gate.e_score_correction_bias for m in trainer.moe_layers]
    assert all(b.abs().sum() > 0 for b in biases)  # the aux-loss-free bias moved after the steps


def test_group_limited_routing_and_routed_scaling_by_hand():
    """DeepSeek-V3's rule on 8 experts in 4 groups of 2, the best 2 groups, top-3: a group's score is the sum of its
    two best biased scores; experts of the other groups never run however high their own score; the weights are the
    unbiased scores of the chosen, normalised, times moe_routed_scaling."""
    gate = layer("model.n_experts=8", "model.moe_top_k=3", "model.moe_router=sigmoid", "model.moe_balance=bias",
                 "model.moe_n_group=4", "model.moe_topk_group=2", "model.moe_routed_scaling=2.5").gate
    x = torch.randn(64, 32)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 8))
        weights, chosen, scores, _ = gate(x)
    for row in range(64):
        biased = scores[row] + gate.e_score_correction_bias
        group = biased.view(4, 2).sum(-1)  # two experts a group: both are its two best
        allowed = set()
        for g in sorted(range(4), key=lambda g: -float(group[g]))[:2]:
            allowed |= {2 * g, 2 * g + 1}
        expected = sorted(sorted(allowed, key=lambda e: -float(biased[e]))[:3])
        assert sorted(chosen[row].tolist()) == expected
        picked = scores[row, chosen[row]]
        torch.testing.assert_close(weights[row], 2.5 * picked / picked.sum())
    # the highest-scoring expert overall is skipped whenever its group loses
    assert any(int(scores[r].argmax()) not in chosen[r].tolist() for r in range(64))


@pytest.mark.parametrize("extra, message", [
    (["model.moe_top_k=5"], r"model.moe_top_k \(5\) exceeds model.n_experts \(4\)"),
    (["model.arch=bert"], r"Mixture-of-Experts layers are for the llama-flavour GPT, not bert"),
    (["model.flavor=gpt2"], r"Mixture-of-Experts layers are for the llama-flavour GPT, not gpt/gpt2"),
    (["model.moe_dense_layers=2"], r"model.moe_dense_layers \(2\) leaves no MoE layer"),
    (["parallel.engine=deepspeed"], r'MoE layers train with parallel.engine = "native"'),
    (["model.moe_capacity_factor=0.5"], r"model.moe_capacity_factor = 0.5 would drop tokens even under"),
    (["model.n_experts=0", "parallel.ep=2"], r"parallel.ep = 2 splits MoE experts, but model.n_experts = 0"),
    (["model.moe_aux_scope=token"], r"model.moe_aux_scope = 'token' is not one of sequence, micro_batch"),
    (["model.moe_router=topk"], r"model.moe_router = 'topk' is not one of softmax, sigmoid"),
    (["model.moe_balance=none"], r"model.moe_balance = 'none' is not one of aux_loss, bias, both"),
    (["model.moe_aux_coef=-1"], r"model.moe_aux_coef must be >= 0"),
    (["model.moe_n_group=3"], r"model.moe_n_group \(3\) does not divide model.n_experts \(4\)"),
    (["model.moe_n_group=2", "model.moe_topk_group=3"], r"model.moe_topk_group \(3\) exceeds model.moe_n_group \(2\)"),
    (["model.moe_n_group=4", "model.moe_topk_group=1"],
     r"model.moe_top_k \(2\) exceeds the experts of model.moe_topk_group \(1\) groups of 1"),
    (["model.moe_routed_scaling=0"], r"model.moe_routed_scaling must be > 0"),
])
def test_bad_moe_configs(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", *MOE, *extra])


@pytest.mark.parametrize("extra, world, message", [
    (["parallel.ep=3", "parallel.zero_stage=3"], 6, r"parallel.ep = 3 must divide model.n_experts \(4\)"),
    (["parallel.ep=4", "parallel.zero_stage=3", "parallel.tp=2"], 4,
     r"parallel.ep = 4 takes its ranks from dp_shard \(2 here\): it must divide it"),
    (["parallel.ep=2"], 2, r"parallel.ep = 2 needs FSDP for the experts' gradients: set parallel.zero_stage = 2"),
])
def test_bad_expert_parallel_layouts_are_refused_before_any_process_group(extra, world, message):
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", *MOE, *extra])
    with pytest.raises(ConfigError, match=message):
        ParallelDims.from_config(cfg, world)


def test_resume_is_exact_with_router_biases(tmp_path):
    extra = [*MOE, "model.moe_balance=both", "train.steps=4", "checkpoint.interval=2"]
    straight = build_trainer(tiny_config(tmp_path / "a", *extra), DistInfo()).fit()
    build_trainer(tiny_config(tmp_path / "b", *extra), DistInfo()).fit(stop_after=2)
    resumed = build_trainer(tiny_config(tmp_path / "b", *extra), DistInfo())
    assert resumed.fit() == straight
    biases = [m.gate.e_score_correction_bias for m in resumed.moe_layers]
    assert biases and all(b.abs().sum() > 0 for b in biases)


def test_balancing_terms_enter_the_gradient_at_the_steps_scale(tmp_path, monkeypatch):
    """One process: the trainer's gradient equals that of (Σ cross-entropy + Σ_layers (aux·coef + z·coef)) divided
    by the step's target count, computed here by hand — the balancing terms carry the same normalisation as the
    main loss (a layer ignoring the step's scale would give them ~1000× the weight)."""
    import copy

    import torch.nn.functional as F

    from pretrain.models import moe

    cfg = tiny_config(tmp_path, "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32",
                      "model.moe_aux_coef=0.5", "model.moe_z_coef=0.05", "optim.grad_clip=0",
                      "train.micro_batch_size=4", "train.grad_accum=2")
    trainer = build_trainer(cfg, DistInfo())
    on_one_batch(trainer)
    batch = trainer.data.next_batch()
    reference = copy.deepcopy(trainer.raw_model)  # the weights before the step's update
    trainer.optimizer.zero_grad = lambda set_to_none=True: None
    trainer.train_step()
    ours = {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()}

    terms = []
    monkeypatch.setattr(moe._LossAtLayer, "apply", lambda y, t, scale: (terms.append(t), y)[1])
    reference.train()
    total, count = 0.0, 0
    for _ in range(2):  # the step's two micro-batches (on_one_batch feeds the same one each time)
        tokens, targets = batch["tokens"], batch["targets"]
        logits = reference(tokens)
        total = total + F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        count += int((targets != -100).sum())
    assert len(terms) == 2 * cfg.model.n_layers and all(t.requires_grad for t in terms)
    ((total + sum(terms)) / count).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert ours["layers.1.mlp.gate.weight"].abs().max() > 0
