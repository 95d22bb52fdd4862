"""The step-cost meter against hand counts: a matmul's FLOPs, an add's bytes, a planted .item() as a host sync,
launches; the per-token / per-micro-batch and per-layer fit on a model whose costs are known; the project's
models with both kernel sets; the CLI's JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.plan import step_cost
from pretrain.plan.roofline import report, roofline
from pretrain.plan.step_cost import Cost, counting, measure

ROOT = Path(__file__).resolve().parents[2]


def test_hand_counts_of_one_tiny_block():
    x, w = torch.randn(5, 7), torch.randn(7, 3)
    cost = Cost()
    with counting(cost):
        y = x @ w  # mm: 2·5·3·7 FLOPs, one launch, no non-matmul bytes
        z = y + y  # add: reads 15 + 15 floats, writes 15
        v = z.view(15).t()  # views: free
        n = int(z.sum())  # sum: reads 15, writes 1; int(): one host sync
        z.mul_(2.0)  # in place: reads 15, writes 15
        e = torch.empty(100)  # allocation without a kernel: free
    assert cost.matmul_flops == 2 * 5 * 3 * 7
    assert cost.by_op["aten::add"] == 3 * 15 * 4
    assert cost.by_op["aten::sum"] == (15 + 1) * 4
    assert cost.by_op["aten::mul_"] == 2 * 15 * 4
    assert cost.bytes == (45 + 16 + 30) * 4
    assert cost.syncs == 1
    assert cost.launches == 4  # mm, add, sum, mul_
    assert v.numel() == 15 and isinstance(n, int) and e.numel() == 100


def test_a_broadcast_input_counts_its_distinct_elements():
    a, b = torch.randn(64, 32), torch.randn(32)
    cost = Cost()
    with counting(cost):
        a * b.expand(64, 32)  # b is read once, not 64 times
    assert cost.bytes == (64 * 32 * 2 + 32) * 4


class Layer(torch.nn.Module):
    """Per micro-batch: a weight cast (fp32 -> bf16, 64x64); per token: one mul of the (T, 64) activations."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        self.weight.detach().to(torch.bfloat16)  # 64·64·(4 + 2) bytes whatever the token count
        return x * 2.0  # T·64·4 read + T·64·4 written


class CastOnce(torch.nn.Module):
    """Per step: a weight cast (its step casts it once, as autocast's cache does); per token: the same mul."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        return x * 2.0


@pytest.mark.parametrize("per", ["micro_batch", "step"])
def test_fit_separates_tokens_micro_batches_steps_and_layers(monkeypatch, per):
    def builder(cfg, n_layers, tokens, kernels, like=None):
        layers = torch.nn.ModuleList((Layer if per == "micro_batch" else CastOnce)() for _ in range(n_layers))

        def step(batches):
            with torch.no_grad():
                if per == "step":
                    for layer in layers:
                        layer.weight.detach().to(torch.bfloat16)  # 64·64·(4 + 2) bytes a step
                for _ in batches:
                    x = torch.zeros(tokens, 64) + 1.0  # outside the layers: T·64·4 written (zeros) + 2·T·64·4 (add)
                    for layer in layers:
                        x = layer(x)
        return layers, step

    monkeypatch.setitem(step_cost.BUILDERS, None, builder)
    cfg = load_config(None, ["model.d_model=64", "model.n_heads=4", "model.vocab_size=64", "model.seq_len=32",
                             "train.dtype=fp32"])
    m = measure(cfg, tokens=(16, 48), layers=(1, 3))
    cast = 64 * 64 * (4 + 2)
    assert m.nonmatmul_bytes_per_token_layer == pytest.approx(64 * 4 * 2)
    assert m.nonmatmul_bytes_per_microbatch_layer == pytest.approx(cast if per == "micro_batch" else 0, abs=1e-6)
    assert m.nonmatmul_bytes_per_step_layer == pytest.approx(cast if per == "step" else 0, abs=1e-6)
    assert m.outside_bytes_per_token == pytest.approx(64 * 4 * 3)
    assert m.outside_bytes_per_microbatch == pytest.approx(0, abs=1e-6)
    assert m.outside_bytes_per_step == pytest.approx(0, abs=1e-6)
    assert m.launches_per_layer == pytest.approx(2 if per == "micro_batch" else 1)  # the cast (here) and the mul
    assert m.launches_per_step_layer == pytest.approx(0 if per == "micro_batch" else 1)


@pytest.fixture(scope="module")
def tiny():
    return load_config(None, ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                              "model.vocab_size=256", "model.seq_len=64", "train.dtype=bf16",
                              "train.micro_batch_size=2", "train.grad_accum=3"])


def test_gpt_with_torch_kernels(tiny):
    m = measure(tiny, "torch", tokens=(32, 64))
    d, e, h, kv, f = 64, 16, 4, 2, tiny.model.ffn_dim
    assert m.matmul_flops_per_token_layer == pytest.approx(6 * (2 * d * h * e + 2 * d * kv * e + 3 * d * f))
    assert m.outside_matmul_flops_per_token == pytest.approx(6 * d * 256)  # the head
    # SDPA read as FlashAttention-2: causal pairs at the config's 64 tokens, backward 2.5x the forward
    assert m.attention_fwd_flops_per_token_layer == pytest.approx(4 * h * e * 65 / 2)
    assert m.attn_bwd_over_fwd_flops == pytest.approx(2.5)
    assert m.syncs_per_microbatch == 0 and m.syncs_per_step == 0
    # per weight (bf16 weight copies, the default): each micro-batch's bf16 weight gradient is added to an fp32 sum
    # (2 + 4 read, 4 written); the step copies each fp32 weight to bf16 (4 + 2 B) and the first micro-batch casts
    # its gradient to the fp32 sum (2 + 4 B) instead of adding it (- 10 B); the norms' weights add a little
    weights = 2 * d * h * e + 2 * d * kv * e + 3 * d * f
    assert m.nonmatmul_bytes_per_microbatch_layer == pytest.approx(10 * weights, rel=0.02)
    assert m.nonmatmul_bytes_per_step_layer == pytest.approx((6 + 6 - 10) * weights, rel=0.02)
    # train.grad_accum_dtype = "bf16": the GEMM adds into its own output (addmm_, a matmul: no bytes); the step
    # pays the copies and the one cast back (6 + 6 B); a micro-batch only the norms' fp32 weights' adds
    b = measure(load_config(None, [*_overrides(tiny), "train.grad_accum_dtype=bf16"]), "torch", tokens=(32, 64))
    assert b.nonmatmul_bytes_per_microbatch_layer < 0.02 * 6 * weights
    assert b.nonmatmul_bytes_per_step_layer == pytest.approx((6 + 6) * weights, rel=0.02)
    # autocast over fp32 weights: each micro-batch casts its bf16 gradient to fp32 (2 + 4 B) and adds it to the
    # accumulated one (4 + 4 + 4 B); the step casts each fp32 weight to bf16 once (autocast entered once a step:
    # 4 + 2 B) and its first micro-batch writes its gradients instead of adding them (- 12 B)
    a = measure(load_config(None, [*_overrides(tiny), "train.mixed_precision=autocast"]), "torch", tokens=(32, 64))
    assert a.nonmatmul_bytes_per_microbatch_layer == pytest.approx(18 * weights, rel=0.02)
    assert a.nonmatmul_bytes_per_step_layer == pytest.approx((6 - 12) * weights, rel=0.02)
    # and runs q, k, v as three GEMMs: two adds of their bf16 input gradients (2 + 2 read, 2 written a token and
    # element of d_model, twice) where the copies' one GEMM concatenates dq, dk, dv (2 + 2 B an element of H + 2K
    # heads); the rest a token is the same
    assert a.nonmatmul_bytes_per_token_layer - m.nonmatmul_bytes_per_token_layer == pytest.approx(
        2 * 6 * d - 4 * (h + 2 * kv) * e, rel=1e-6)
    assert m.optimizer_launches == 4  # fused AdamW per parameter group, and its step counters' foreach add
    assert m.optimizer_bytes_per_param == pytest.approx(28, rel=0.01)  # p, m, v read + written, g read (fp32)


def test_activation_checkpointing_is_counted_and_keeps_the_per_call_ratio(tiny):
    """Full checkpointing recomputes the forward (counted) without reading as a cheaper backward. With bf16
    weight copies it recomputes what autocast's run does: there the copies accumulate through autograd — a custom
    Function's GEMM accumulation would save its inputs after its matmul and make torch's recompute run each
    block's last projection again (+6 % of the matmul FLOPs here before)."""
    plain = measure(tiny, "torch", tokens=(32, 64))
    checkpointed = [*_overrides(tiny), "parallel.activation_checkpointing=full"]
    full = measure(load_config(None, checkpointed), "torch", tokens=(32, 64))
    assert full.attention_fwd_flops_per_token_layer == pytest.approx(2 * plain.attention_fwd_flops_per_token_layer)
    assert plain.matmul_flops_per_token_layer < full.matmul_flops_per_token_layer
    assert full.attn_bwd_over_fwd_flops == pytest.approx(2.5)  # the recomputed forward is not a cheaper backward
    autocast = measure(load_config(None, [*checkpointed, "train.mixed_precision=autocast"]), "torch", tokens=(32, 64))
    assert full.matmul_flops_per_token_layer == pytest.approx(autocast.matmul_flops_per_token_layer, rel=1e-9)


def test_gpt_with_triton_kernels_declares_their_work(tiny):
    torch_m = measure(tiny, "torch", tokens=(32, 64))
    m = measure(tiny, "triton", tokens=(32, 64))
    assert m.matmul_flops_per_token_layer == pytest.approx(torch_m.matmul_flops_per_token_layer)
    assert m.attention_fwd_flops_per_token_layer == pytest.approx(torch_m.attention_fwd_flops_per_token_layer)
    assert m.attn_bwd_over_fwd_flops == pytest.approx(2.5)  # one pass: 5 matmuls in the backward against 2
    assert m.syncs_per_microbatch == 0 and m.syncs_per_step == 0  # the cross-entropy's count stays on the device
    rep = report(m, tiny)
    assert rep["host_syncs_per_step"] == 0
    assert {"pretrain::norm_fwd", "pretrain::norm_bwd", "pretrain::rotary"} <= set(m.bytes_by_op)
    # one fused norm moves x in and y out: less than torch's decomposed rms_norm
    assert m.nonmatmul_bytes_per_token_layer < torch_m.nonmatmul_bytes_per_token_layer
    # gate and up as one GEMM into the packed SwiGLU (bf16 weight copies): one input gradient, not two added
    # (2 + 2 read, 2 written a token and element of d_model); q, k, v as one GEMM (as with torch kernels above)
    a = measure(load_config(None, [*_overrides(tiny), "train.mixed_precision=autocast"]), "triton", tokens=(32, 64))
    assert {"pretrain::swiglu_packed_fwd", "pretrain::swiglu_packed_bwd"} <= set(m.bytes_by_op)
    assert "pretrain::swiglu_fwd" in a.bytes_by_op
    assert a.nonmatmul_bytes_per_token_layer - m.nonmatmul_bytes_per_token_layer == pytest.approx(
        6 * 64 + 2 * 6 * 64 - 4 * (4 + 2 * 2) * 16, rel=0.02)


def test_roofline_reads_the_config(tiny):
    m = measure(tiny, "torch", tokens=(32, 64))
    one = roofline(m, tiny, "h100")
    more = roofline(m, load_config(None, [*_overrides(tiny), "train.grad_accum=6"]), "h100")
    from pretrain.plan.hardware import METER, gpu

    layers = tiny.model.n_layers
    once = ((m.nonmatmul_bytes_per_step_layer * layers + m.outside_bytes_per_step)
            / (gpu("h100").hbm_tb_s * 1e12 * METER.hbm_efficiency)
            + (m.launches_per_step_layer * layers + m.outside_launches_per_step + m.optimizer_launches) * 2e-6)
    assert once != 0  # autocast's casts once a step, less the first micro-batch's gradients written, not added
    assert more.step_s == pytest.approx(2 * one.step_s - once - one.parts["optimizer"], rel=1e-6)
    assert 0 < one.mfu < 1 and one.parts["memory"] > 0
    assert roofline(m, tiny, "b200").step_s < one.step_s


def _overrides(cfg):
    return ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=256",
            "model.seq_len=64", "train.dtype=bf16", "train.micro_batch_size=2"]


def test_cli_json_and_bad_arguments():
    args = [sys.executable, "tools/step_cost.py", "--set", *_overrides(None), "--tokens", "32,64"]
    out = subprocess.run([*args, "--json", "--kernels", "triton"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    for key in ("nonmatmul_bytes_per_token_layer", "attn_bwd_over_fwd_flops", "launches_per_layer"):
        assert rep[key] > 0
    assert rep["host_syncs_per_step"] == 0
    assert set(rep["roofline_mfu"]) == {"h100", "h200", "b200"} and all(0 < v < 1 for v in rep["roofline_mfu"].values())
    bad = subprocess.run([*args, "--kernels", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: model.kernels = 'cuda'")
    bad = subprocess.run([*args[:2], "--tokens", "64,32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "two increasing positive integers" in bad.stderr


def test_peer_torchtitan_column(tiny):
    pytest.importorskip("torchtitan.models.llama3")
    peer = step_cost.peer_measure("torchtitan", tiny, tokens=(32, 64))
    ours = measure(tiny, "torch", tokens=(32, 64))
    # the same shape: the same matmul work; bf16 parameters accumulate bf16 gradients through autograd (2 + 2 + 2 B
    # a weight and micro-batch), our copies into fp32 sums (2 + 4 + 4 B; autocast over fp32 weights: 6 + 12)
    assert peer.matmul_flops_per_token_layer == pytest.approx(ours.matmul_flops_per_token_layer)
    assert ours.nonmatmul_bytes_per_microbatch_layer == pytest.approx(10 / 6 * peer.nonmatmul_bytes_per_microbatch_layer,
                                                                      rel=0.05)


def test_planner_search_takes_the_meters_bytes(capsys):
    """--meter puts the model's measured HBM bytes per activation element into the speed model: the printed
    constant is the meter's, and the predicted speed differs from the fitted constant's."""
    from pretrain.plan.__main__ import main
    from pretrain.plan.roofline import memory_bytes_per_element

    overrides = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.vocab_size=256",
                 "model.seq_len=256", "train.dtype=bf16"]
    args = ["--set", *overrides, "--gpus", "2", "--gpu", "h100", "--global-batch-tokens", "4K", "--top", "1"]
    assert main(args) == 0
    fitted = capsys.readouterr().out
    assert main([*args, "--meter"]) == 0
    metered = capsys.readouterr().out
    expected = memory_bytes_per_element(measure(load_config(None, overrides)), load_config(None, overrides))
    assert f"memory_bytes: {expected:.0f} per activation element and layer" in metered
    tokens_per_s = lambda out: [line.split()[-4] for line in out.splitlines() if line.startswith(" 1 ")][0]
    assert tokens_per_s(fitted) != tokens_per_s(metered)


def test_rms_norm_counts_as_cuda_runs_it():
    """While the meter runs a model, ``F.rms_norm`` with the weight in the input's dtype counts as CUDA's fused
    forward and backward kernels (the values are torch's own); with dtypes that differ CUDA decomposes it too,
    and the CPU's decomposition is counted."""
    from pretrain.plan.step_cost import Cost, _as_cuda_runs, counting

    x = torch.randn(6, 64, dtype=torch.bfloat16, requires_grad=True)
    for weight, fused in ((torch.rand(64, dtype=torch.bfloat16, requires_grad=True), True),
                          (torch.rand(64, requires_grad=True), False)):
        cost = Cost()
        with _as_cuda_runs(), counting(cost):
            y = torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)
            y.float().sum().backward()
        want = torch.nn.functional.rms_norm(x.detach(), (64,), weight.detach(), 1e-6)
        assert torch.equal(y.detach(), want)
        if fused:
            assert cost.by_op["rms_norm (CUDA fused)"] == 6 * 64 * 2 * 2 + 64 * 2 + 6 * 4  # x, y; w; rstd
            assert cost.launches_by_op["rms_norm_backward (CUDA fused)"] == 1 and "aten::pow" not in cost.by_op
        else:
            assert "aten::pow" in cost.by_op and "rms_norm (CUDA fused)" not in cost.by_op
    assert torch.nn.functional.rms_norm.__name__ == "rms_norm"  # put back


def test_sdpa_work_with_a_value_head_dim_of_its_own():
    """MLA's SDPA (q/k head dim 12, v 8; the CUDA kernels take them, the meter reads their shapes): QKᵀ over E and
    PV over Ev forward, recomputed QKᵀ, dK, dQ over E and dP, dV over Ev backward; with one head dim, 4·E and
    2.5× that."""
    q, k, v = torch.zeros(2, 3, 10, 12), torch.zeros(2, 3, 10, 12), torch.zeros(2, 3, 10, 8)
    pairs = 10 * 11 / 2
    assert step_cost.sdpa_flops(q, k, True, v) == 2 * 2 * 3 * (12 + 8) * pairs
    assert step_cost.sdpa_flops(q, k, True, v, backward=True) == 2 * 2 * 3 * (3 * 12 + 2 * 8) * pairs
    assert step_cost.sdpa_flops(q, k, False) == 4 * 2 * 3 * 12 * 100
    assert step_cost.sdpa_flops(q, k, False, backward=True) == step_cost.FA2_BACKWARD_OVER_FORWARD * 4 * 2 * 3 * 12 * 100
