"""Multi-token prediction (model.mtp_depth; models/gpt.py MTPModule): the depth-1 loss against a hand computation
that shifts the targets by two, document boundaries, a zero coefficient leaving training bit for bit the model's
without MTP, the losses logged apart, FLOPs against torch's counter, and the refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistInfo
from pretrain.metrics import read_metrics
from pretrain.models import build_model
from pretrain.models.flops import flops_per_token, num_params
from pretrain.train import build_trainer

from ..conftest import tiny_config

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=96", "model.seq_len=24"]


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_depth_one_loss_is_the_next_next_token_cross_entropy_by_hand():
    cfg = load_config(None, [*SMALL, "model.mtp_depth=1"]).model
    torch.manual_seed(0)
    model = build_model(cfg).double()
    tokens = torch.randint(0, 96, (2, 19))
    targets = torch.cat([tokens[:, 1:], torch.randint(0, 96, (2, 1))], 1)  # the next token of each position
    _, [(loss, count)] = model(tokens, mtp_targets=targets)
    # by hand: position i reads the main stream at i and the embedding of tokens[i + 1]; it predicts tokens[i + 2]
    mtp = model.mtp[0]
    x = model.embed_tokens(tokens)
    for layer in model.layers.values():
        x = layer(x, model.rotary)
    stream = x
    e = model.embed_tokens(targets)  # targets[i] = tokens[i + 1]
    eps = cfg.norm_eps
    h = F.linear(torch.cat([rms(e, mtp.enorm.weight, eps), rms(stream, mtp.hnorm.weight, eps)], -1),
                 mtp.eh_proj.weight)
    h = mtp.block(h, model.rotary)
    logits = F.linear(rms(h, mtp.norm.weight, eps), model.lm_head.weight)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 96), targets[:, 1:].reshape(-1), reduction="sum")
    assert int(count) == 2 * 18
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-10)


def test_chains_crossing_a_document_or_an_ignored_target_are_not_scored():
    cfg = load_config(None, [*SMALL, "model.mtp_depth=2"]).model
    model = build_model(cfg)
    tokens = torch.randint(0, 96, (1, 12))
    targets = torch.cat([tokens[:, 1:], torch.tensor([[-100]])], 1)
    ids = torch.tensor([[0] * 5 + [1] * 7])
    _, [(_, one), (_, two)] = model(tokens, mtp_targets=targets, document_ids=ids)
    # depth 1 at i needs targets[i] and targets[i + 1] kept and ids[i + 1] == ids[i]: i in 0..3 and 5..9 -> 9
    # depth 2 needs i + 2 within the row's kept targets and ids[i + 2] == ids[i]: i in 0..2 and 5..8 -> 7
    assert (int(one), int(two)) == (9, 7)


def test_zero_coefficient_trains_bit_for_bit_as_without_mtp_and_the_losses_are_logged(tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("mtp0", ["model.mtp_depth=2", "model.mtp_loss_coef=0"]),
                        ("mtp", ["model.mtp_depth=2", "model.mtp_loss_coef=0.3"])):
        cfg = tiny_config(tmp_path / name, *extra, "train.steps=4", "logging.interval=1")
        trainer = build_trainer(cfg, DistInfo())
        trainer.fit()
        rows = [r for r in read_metrics(cfg.logging.run_dir) if "loss" in r]
        runs[name] = rows, {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    plain, zero, with_mtp = runs["plain"], runs["mtp0"], runs["mtp"]
    assert [r["loss"] for r in zero[0]] == [r["loss"] for r in plain[0]]
    # the norm also sums the MTP parameters' zero gradients: the same to the reduction's rounding
    for a, b in zip(zero[0], plain[0]):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * b["grad_norm"]
    for key, value in plain[1].items():
        assert torch.equal(zero[1][key], value), key
    assert all("mtp_loss_1" in r and "mtp_loss_2" in r and r["mtp_loss"] == 0 for r in zero[0])
    assert all(r["mtp_loss"] > 0 for r in with_mtp[0])
    # the coefficient moves the main model: its parameters leave the plain run's
    assert not torch.equal(with_mtp[1]["layers.0.self_attn.q_proj.weight"], plain[1]["layers.0.self_attn.q_proj.weight"])


def test_an_mla_moe_model_with_mtp_trains_and_balances_its_mtp_experts(tmp_path):
    """MTP blocks past the model's layers are MoE blocks too: their loads join the balancing (bias update) and
    their metrics; the planner's FLOPs equal the model's."""
    from pretrain.plan.search import shape_of

    cfg = tiny_config(tmp_path, "model.n_experts=4", "model.moe_top_k=2", "model.moe_router=sigmoid",
                      "model.moe_balance=bias", "model.mtp_depth=1", "model.attention=mla", "model.kv_lora_rank=8",
                      "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8", "train.steps=3",
                      "logging.interval=1")
    trainer = build_trainer(cfg, DistInfo())
    trainer.fit()
    rows = [r for r in read_metrics(cfg.logging.run_dir) if "loss" in r]
    assert len(rows) == 3 and all("mtp_loss_1" in r and f"moe_max_load.{cfg.model.n_layers}" in r for r in rows)
    assert float(trainer.raw_model.mtp[0].block.mlp.gate.e_score_correction_bias.abs().sum()) > 0
    assert shape_of(cfg).flops_per_token(cfg.model.seq_len) == flops_per_token(cfg.model)


@pytest.mark.parametrize("extra", [[], ["model.n_experts=4", "model.moe_top_k=2", "model.moe_dense_layers=1"]],
                         ids=["dense", "moe"])
def test_mtp_flops_and_parameters_match_the_counters(extra):
    cfg = load_config(None, [*SMALL, "model.mtp_depth=2", "model.n_kv_heads=2", *extra]).model
    model = build_model(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "dispatcher"):
            module.dispatcher.grouped = False  # the counter counts the per-expert loop's matmuls
    tokens = torch.randint(8, 96, (3, 24))
    targets = torch.randint(8, 96, (3, 24))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        logits, depths = model(tokens, mtp_targets=targets)
        (logits.sum() + sum(loss for loss, _ in depths)).backward()
    assert counter.get_total_flops() == flops_per_token(cfg) * tokens.numel()


@pytest.mark.parametrize("extra, message", [
    (["parallel.pp=2", "parallel.pp_schedule=zbv"], r'model.mtp_depth = 1 with parallel.pp_schedule = "zbv" is not '
                                                     r"supported yet"),
    (["model.flavor=gpt2"], r"model.mtp_depth is for the llama-flavour GPT, not gpt/gpt2"),
    (["model.mtp_loss_coef=-1"], r"model.mtp_loss_coef must be >= 0"),
])
def test_bad_mtp_configs(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL, "model.mtp_depth=1", *extra])
