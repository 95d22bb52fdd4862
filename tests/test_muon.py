"""Muon (pretrain/muon.py): the update against torch.optim.Muon and AdamW's against torch.optim.AdamW, bit for
bit; stacked experts as separate matrices; which parameters take which; training, resume, bad configs. Every
parallel layout against one process: the muon_* layouts in tests/parallel/harness.py."""

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistInfo
from pretrain.models import build_model
from pretrain.muon import MuonAdamW, muon_groups, newton_schulz
from pretrain.train import build_trainer

from .conftest import on_one_batch, tiny_config


def test_one_matrix_update_equals_torch_muon_bit_for_bit():
    torch.manual_seed(0)
    for shape, nesterov in (((24, 40), True), ((40, 24), False)):
        ours_p = torch.nn.Parameter(torch.randn(shape))
        ref_p = torch.nn.Parameter(ours_p.detach().clone())
        ref = torch.optim.Muon([ref_p], lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                               adjust_lr_fn="match_rms_adamw")
        ours = MuonAdamW([{"params": [ours_p], "muon": True, "weight_decay": 0.1}], lr=0.02, momentum=0.9,
                         nesterov=nesterov)
        for _ in range(4):
            g = torch.randn(shape)
            ours_p.grad, ref_p.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
        assert torch.equal(ours_p, ref_p)


def test_newton_schulz_orthogonalises_and_stacks_are_per_matrix():
    torch.manual_seed(1)
    u = torch.randn(6, 32, 16)
    stacked = newton_schulz(u)
    for i in range(6):
        assert torch.equal(stacked[i], newton_schulz(u[i]))
    singular = torch.linalg.svdvals(stacked[0].float())
    assert 0.5 < singular.min() and singular.max() < 1.5  # NS5's "≈ orthogonal": singular values near 1


def test_adamw_part_equals_torch_adamw_bit_for_bit():
    torch.manual_seed(2)
    ours_p = torch.nn.Parameter(torch.randn(7, 5))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    ours = MuonAdamW([{"params": [ours_p], "muon": False, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95),
                     eps=1e-8)
    ref = torch.optim.AdamW([ref_p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(7, 5)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(ours_p, ref_p)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_experts=4",
                             "model.moe_top_k=2", "model.moe_dense_layers=1", "model.n_shared_experts=1"]).model
    model = build_model(cfg)
    muon, decay, other = muon_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon["params"]}
    assert "layers.0.self_attn.q_proj.weight" in muon_names and "layers.0.mlp.down_proj.weight" in muon_names
    assert "layers.1.mlp.experts.gate_up_proj" in muon_names  # stacked: one matrix per expert
    assert "layers.1.mlp.shared_experts.up_proj.weight" in muon_names
    assert {names[id(p)] for p in decay["params"]} == {"lm_head.weight", "layers.1.mlp.gate.weight"}
    assert "embed_tokens.weight" in {names[id(p)] for p in other["params"]} and other["weight_decay"] == 0.0
    assert muon["muon"] and not decay["muon"] and not other["muon"]
    assert len(muon["params"]) + len(decay["params"]) + len(other["params"]) == len(list(model.parameters()))


def test_gpt_overfits_a_batch_with_muon(tmp_path):
    trainer = build_trainer(tiny_config(tmp_path, "optim.name=muon", "optim.lr=0.01", "train.steps=30",
                                        "schedule.warmup_steps=2", "optim.weight_decay=0"), DistInfo())
    on_one_batch(trainer)
    losses = trainer.fit()
    assert losses[-1] < 0.5 * losses[0], losses


def test_muon_resumes_exactly(tmp_path):
    extra = ["optim.name=muon", "train.steps=6", "checkpoint.interval=3"]
    straight = build_trainer(tiny_config(tmp_path / "a", *extra), DistInfo()).fit()
    build_trainer(tiny_config(tmp_path / "b", *extra), DistInfo()).fit(stop_after=3)
    resumed = build_trainer(tiny_config(tmp_path / "b", *extra), DistInfo())
    assert resumed.fit() == straight
    assert any("momentum_buffer" in s for s in resumed.optimizer.state.values())


@pytest.mark.parametrize("extra, message", [
    (["optim.impl=triton"], 'optim.impl = "triton" does not apply'),
    (["parallel.engine=deepspeed"], 'optim.name = "muon" runs on the native engine'),
    (["parallel.zero_stage=1"], "ZeRO-1 splits the optimizer by whole tensors for AdamW only"),
    (["optim.muon_momentum=1.0"], "optim.muon_momentum must be"),
    (["optim.name=lion"], "optim.name = 'lion' is not one of adamw, muon"),
])
def test_bad_muon_configs(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["optim.name=muon", *extra])
