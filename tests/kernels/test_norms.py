import pytest
import torch

from pretrain.kernels import reference

norms = pytest.importorskip("pretrain.kernels.norms")


@pytest.mark.parametrize("shape", [(3, 37, 48), (1, 80), (130, 64), (2, 1, 33)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_matches_reference_fp32(shape, kind):
    torch.manual_seed(sum(shape))
    d = shape[-1]
    x = torch.randn(*shape, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d)).requires_grad_()
    b = (0.1 * torch.randn(d)).requires_grad_()
    dy = torch.randn(*shape)
    if kind == "rms":
        ours, ref = norms.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)
        inputs = (x, w)
    else:
        ours, ref = norms.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5)
        inputs = (x, w, b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(ours, inputs, dy)
    want = torch.autograd.grad(ref, inputs, dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_non_contiguous_rows_and_bad_inputs():
    x = torch.randn(8, 96)[:, :48]  # row stride 96: taken as it is
    w = torch.ones(48)
    torch.testing.assert_close(norms.rms_norm(x, w), reference.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"norm weight / bias must have shape \(48,\)"):
        norms.rms_norm(x, torch.ones(47))
    with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
        norms.rms_norm(x.long(), w.long())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_half_precision_on_cuda(dtype):
    x = torch.randn(64, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    b = torch.randn(4096, device="cuda", dtype=dtype)
    torch.testing.assert_close(norms.rms_norm(x, w), reference.rms_norm(x, w, 1e-6), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(norms.layer_norm(x, w, b), reference.layer_norm(x, w, b, 1e-5), atol=2e-2, rtol=2e-2)
