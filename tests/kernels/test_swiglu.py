"""The fused SwiGLU (kernels/swiglu.py) against silu(g) · u: forward and both gradients, fp32 and fp16 (bf16 only
under @gpu: the interpreter truncates its casts), odd sizes, bad inputs, and through the model's MLP."""

import pytest
import torch

from pretrain.kernels import reference

swiglu = pytest.importorskip("pretrain.kernels.swiglu")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (2, 5, 1500)])
def test_swiglu_matches_silu_times_up(shape, dtype, tol):
    torch.manual_seed(sum(shape))
    g = (torch.randn(*shape) * 4).to(dtype).requires_grad_()  # large |g|: sigmoid's tails
    u = torch.randn(*shape).to(dtype).requires_grad_()
    ours, ref = swiglu.swiglu(g, u), reference.swiglu(g, u)
    assert ours.dtype == dtype and ours.shape == g.shape
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    dh = torch.randn(*shape).to(dtype)
    for a, b in zip(torch.autograd.grad(ours, (g, u), dh), torch.autograd.grad(ref, (g, u), dh)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(3, 74), (1, 2), (2, 5, 3000)])
def test_packed_swiglu_matches_the_two_halves(shape, dtype, tol):
    """gu = [g, u] side by side (a fused gate/up projection's output): h from each row's halves, and the
    (..., 2F) gradient written whole equals the reference's."""
    torch.manual_seed(sum(shape))
    gu = (torch.randn(*shape) * 4).to(dtype).requires_grad_()
    ours, ref = swiglu.swiglu_packed(gu), reference.swiglu_packed(gu)
    assert ours.dtype == dtype and ours.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    dh = torch.randn(*ours.shape).to(dtype)
    got, want = torch.autograd.grad(ours, gu, dh)[0], torch.autograd.grad(ref, gu, dh)[0]
    assert got.shape == gu.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="the last dim must be even"):
        swiglu.swiglu_packed(torch.randn(2, 5))


def test_swiglu_reads_non_contiguous_inputs():
    h = torch.randn(4, 6, 20, requires_grad=True)
    g, u = h.transpose(0, 1), (h * 2).transpose(0, 1)  # strided views, as a split projection might hand over
    torch.testing.assert_close(swiglu.swiglu(g, u), reference.swiglu(g, u))


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu.swiglu(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu.swiglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="unsupported dtype"):
        swiglu.swiglu(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32))


def test_the_mlp_takes_it_with_triton_kernels():
    from pretrain.config import load_config
    from pretrain.models.layers import MLP
    from pretrain.models.ops import Ops

    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4"]).model
    torch.manual_seed(0)
    fused = MLP(cfg, gated=True, bias=False, ops=Ops("swiglu"))
    plain = MLP(cfg, gated=True, bias=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 32, requires_grad=True)
    ours, ref = fused(x), plain(x)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0],
                               atol=1e-6, rtol=1e-6)
    assert fused.ops.swiglu is swiglu.swiglu and plain.ops.swiglu is not swiglu.swiglu
