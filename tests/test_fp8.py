"""FP8 training (train.fp8, torchao's Float8Linear, emulated on CPU): the converted matmuls against a hand-written
emulation, which layers convert, training and resuming (the multi-rank layouts are in tests/parallel/harness.py)."""

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.distributed import DistInfo  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.parallel.fp8 import all_gather_in_fp8, apply_fp8  # noqa: E402
from pretrain.train import build_trainer, main  # noqa: E402

from .conftest import TINY_MODEL, on_one_batch, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fake_fp8(x: torch.Tensor, dtype: torch.dtype, dim: int | None, pow2: bool) -> torch.Tensor:
    """x cast to ``dtype`` with a dynamic scale (amax over the tensor, or along ``dim``), saturated, and back:
    scale = max(dtype) / amax in fp64, rounded down to a power of two for the rowwise recipe."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    top = torch.finfo(dtype).max
    scale = (top / amax.double().clamp(min=1e-12)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return (x.float() * scale).clamp(-top, top).to(dtype).float() / scale


def reference_linear(x, w, b, grad_out, recipe):
    """Output, input gradient and weight gradient of y = x W^T + b with every matmul operand cast as the recipe
    says: tensorwise (e4m3 forward, e5m2 gradient, one scale per tensor) or rowwise (e4m3, one power-of-two
    scale per row of each operand along the matmul's reduced dimension)."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    if recipe == "tensorwise":
        q = lambda t, dtype, dim: fake_fp8(t, dtype, None, False)
        grad_dtype = E5M2
    else:
        q = lambda t, dtype, dim: fake_fp8(t, dtype, dim, True)
        grad_dtype = E4M3
    y = torch.mm(q(x2, E4M3, -1), q(w.t(), E4M3, 0)) + (0 if b is None else b)
    grad_x = torch.mm(q(g2, grad_dtype, -1), q(w.t(), E4M3, -1).t())
    grad_w = torch.mm(q(g2, grad_dtype, 0).t(), q(x2, E4M3, 0))
    return y.reshape(*x.shape[:-1], -1), grad_x.reshape(x.shape), grad_w


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("arch", ["gpt", "bert"])  # bias-free (llama) and biased (BERT) Linear layers
def test_converted_linear_matches_a_hand_written_emulation(tmp_path, recipe, arch):
    cfg = tiny_config(tmp_path, f"train.fp8={recipe}", "model.n_layers=3", "model.d_model=64", arch=arch)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert apply_fp8(model, cfg, torch.device("cpu")) > 0
    layer = model.layers["1"].mlp.up_proj
    assert type(layer).__name__ == "Float8Linear"
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)
    x = (torch.randn(2, 16, 64) * 3).requires_grad_()
    grad_out = torch.randn(2, 16, layer.out_features) * 1e-3
    y = layer(x)
    y.backward(grad_out)
    bias = None if layer.bias is None else layer.bias.detach()
    ref_y, ref_gx, ref_gw = reference_linear(x.detach(), layer.weight.detach(), bias, grad_out, recipe)
    assert (y - ref_y).abs().max() <= 1e-6 * ref_y.abs().max()
    assert (x.grad - ref_gx).abs().max() <= 1e-6 * ref_gx.abs().max()
    assert (layer.weight.grad - ref_gw).abs().max() <= 1e-6 * ref_gw.abs().max()
    plain = torch.nn.functional.linear(x.detach(), layer.weight.detach(), layer.bias)
    assert 1e-4 < (y - plain).abs().max() / plain.abs().max() < 0.1  # it really is FP8: close, not equal


def _converted(cfg) -> set[str]:
    model = build_model(cfg.model)
    apply_fp8(model, cfg, torch.device("cpu"))
    return {name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"}


def test_heads_edge_blocks_excluded_names_and_odd_shapes_stay_in_high_precision(tmp_path):
    base = ["train.fp8=tensorwise", "model.n_layers=4", "model.d_model=64"]
    names = _converted(tiny_config(tmp_path, *base))
    assert {n.split(".")[1] for n in names} == {"1", "2"}  # the first and last block stay in high precision
    assert "layers.1.self_attn.o_proj" in names and "layers.2.mlp.down_proj" in names and "lm_head" not in names
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down
    fewer = _converted(tiny_config(tmp_path, *base, "train.fp8_keep_edge_blocks=0",
                                   'train.fp8_exclude=["layers.*.self_attn.o_proj", "*.gate_proj"]'))
    assert len(fewer) == 4 * 5 and not any(n.endswith(("o_proj", "gate_proj")) for n in fewer)
    assert not _converted(tiny_config(tmp_path, *base, "model.d_model=40", "model.n_heads=4"))  # 40 % 16 != 0
    bert = _converted(tiny_config(tmp_path, *base, "train.fp8_keep_edge_blocks=0", "model.nsp_head=true", arch="bert"))
    assert bert and not any(n.startswith(("mlm_head", "pooler", "nsp_head")) for n in bert)
    moe = _converted(tiny_config(tmp_path, *base, "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32",
                                 "model.n_shared_experts=1", "train.fp8_keep_edge_blocks=0"))
    assert any("shared_experts" in n for n in moe) and not any("router" in n or n.endswith("experts") for n in moe)


@pytest.mark.parametrize("name, arch", [("gpt_tiny", "gpt"), ("bert_tiny", "bert")])
def test_tiny_models_train_with_fp8(tmp_path, name, arch):
    cfg = load_config(ROOT / "configs" / f"{name}.toml", [
        "train.fp8=tensorwise", "train.fp8_keep_edge_blocks=0", "train.steps=20", "train.micro_batch_size=4",
        "schedule.warmup_steps=2", "data.source=synthetic", "eval.interval=0", "checkpoint.interval=0",
        "logging.interval=0", "logging.tensorboard=false", f"logging.run_dir={tmp_path}", "model.seq_len=64"])
    trainer = on_one_batch(build_trainer(cfg, DistInfo()))
    assert sum(type(m).__name__ == "Float8Linear" for m in trainer.parallel.module.modules()) >= 6
    losses = trainer.fit()
    assert losses[-1] < 0.7 * losses[0], losses


def test_fp8_checkpoints_stay_in_the_master_dtype_and_resume_either_way(tmp_path):
    common = ["train.steps=6", "checkpoint.interval=3", "model.n_layers=3", "model.d_model=64",
              "train.fp8_keep_edge_blocks=0"]
    fp8 = [*common, "train.fp8=tensorwise"]
    straight = build_trainer(tiny_config(tmp_path / "a", *fp8), DistInfo()).fit()
    build_trainer(tiny_config(tmp_path / "b", *fp8), DistInfo()).fit(stop_after=3)
    resumed = build_trainer(tiny_config(tmp_path / "b", *fp8), DistInfo())
    assert resumed.fit() == straight  # resume exact
    state = resumed.parallel.module.state_dict()
    plain = build_model(tiny_config(tmp_path, *common).model).state_dict()
    assert state.keys() == plain.keys() and all(state[k].dtype == plain[k].dtype for k in plain)
    # an FP8 checkpoint resumed without FP8 (and the other way) loads and keeps training
    build_trainer(tiny_config(tmp_path / "c", *fp8), DistInfo()).fit(stop_after=3)
    as_plain = build_trainer(tiny_config(tmp_path / "c", *common), DistInfo()).fit()
    assert as_plain[:3] == straight[:3] and len(as_plain) == 6 and as_plain[3:] != straight[3:]
    build_trainer(tiny_config(tmp_path / "d", *common), DistInfo()).fit(stop_after=3)
    as_fp8 = build_trainer(tiny_config(tmp_path / "d", *fp8), DistInfo()).fit()
    assert len(as_fp8) == 6 and all(abs(a - b) < 0.05 for a, b in zip(as_fp8, straight))


def test_float8_all_gather_only_where_it_can_work(tmp_path, caplog):
    def cfg(*extra):
        return tiny_config(tmp_path, "train.fp8=tensorwise", *extra)

    assert all_gather_in_fp8(cfg(), "nccl", fsdp=True)
    with pytest.raises(ConfigError, match="gloo backend cannot send float8 tensors"):
        all_gather_in_fp8(cfg("train.fp8_all_gather=on"), "gloo", fsdp=True)
    with pytest.raises(ConfigError, match="scales each row"):
        all_gather_in_fp8(cfg("train.fp8=rowwise", "train.fp8_all_gather=on"), "nccl", fsdp=True)
    with pytest.raises(ConfigError, match="nothing is FSDP-sharded"):
        all_gather_in_fp8(cfg("train.fp8_all_gather=on"), "nccl", fsdp=False)
    with caplog.at_level(logging.INFO, logger="pretrain.parallel.fp8"):
        assert not all_gather_in_fp8(cfg(), "gloo", fsdp=True)
    assert [r.getMessage() for r in caplog.records] == [
        "fp8: FSDP all-gathers weights in high precision: the gloo backend cannot send float8 tensors (NCCL only)"]
    assert not all_gather_in_fp8(cfg("train.fp8_all_gather=off"), "nccl", fsdp=True)


@pytest.mark.parametrize("extra, message", [
    (["train.fp8=fp4"], "train.fp8 = 'fp4' is not one of none, tensorwise, rowwise"),
    (["train.fp8=tensorwise", "parallel.engine=deepspeed"], "train.fp8 runs on the native engine"),
    (["train.fp8=tensorwise", 'train.fp8_exclude=["lm_head", 3]'], "train.fp8_exclude must be a list of module-name patterns"),
    (["train.fp8_all_gather=yes"], "train.fp8_all_gather = 'yes' is not one of auto, on, off"),
])
def test_bad_fp8_settings_fail_in_one_line(tmp_path, capsys, extra, message):
    args = ["--set", *TINY_MODEL, "train.steps=1", f"logging.run_dir={tmp_path / 'run'}", "data.source=synthetic", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_float8_all_gather_weights_train_save_and_resume_like_plain_ones(tmp_path, monkeypatch):
    """NCCL runs wrap each converted weight for FSDP's float8 all-gather; one process exercises that wrapper
    (not the all-gather): the same losses as plain weights, and a resume through it is exact."""
    import pretrain.parallel.fp8 as fp8

    common = ["train.fp8=tensorwise", "model.n_layers=3", "model.d_model=64", "train.fp8_keep_edge_blocks=0",
              "train.steps=4", "checkpoint.interval=2"]
    plain = build_trainer(tiny_config(tmp_path / "plain", *common), DistInfo()).fit()
    monkeypatch.setattr(fp8, "all_gather_in_fp8", lambda cfg, backend, fsdp: True)
    build_trainer(tiny_config(tmp_path / "wrapped", *common), DistInfo()).fit(stop_after=2)
    resumed = build_trainer(tiny_config(tmp_path / "wrapped", *common), DistInfo())
    assert type(resumed.parallel.module.layers["1"].mlp.up_proj.weight).__name__ == "WeightWithDynamicFloat8CastTensor"
    assert resumed.fit() == plain


def test_float8_all_gather_on_gloo_is_refused_in_one_line(tmp_path):
    """Two gloo ranks, FSDP, train.fp8_all_gather = on: one line from rank 0, non-zero exit, nothing trained."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "pretrain.train", "--set", "model.n_layers=2", "model.d_model=32", "model.n_heads=4",
                           "model.vocab_size=64", "model.seq_len=16", "train.steps=2", "train.micro_batch_size=2",
                           "data.source=synthetic", "logging.tensorboard=false", "parallel.zero_stage=3",
                           "train.fp8=tensorwise", "train.fp8_all_gather=on", f"logging.run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ['error: train.fp8_all_gather = "on" cannot work here: the gloo backend cannot send float8 '
                     'tensors (NCCL only)'], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_fp8_that_converts_no_layer_is_refused_not_a_silent_no_op(tmp_path, capsys):
    """Two blocks with one kept at each edge: nothing left to convert — one line, not a bf16 run called FP8."""
    from pretrain.train import main

    code = main(["--set", "train.fp8=tensorwise", "model.n_layers=2", "train.steps=1", "logging.tensorboard=false",
                 f"logging.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1
    assert "train.fp8 = 'tensorwise' converts no Linear layer of this model" in err
    assert "train.fp8_keep_edge_blocks = 1" in err
