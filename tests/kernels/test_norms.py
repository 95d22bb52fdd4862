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


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.float32, torch.float16)])
@pytest.mark.parametrize("shape", [(3, 37, 48), (1, 80), (130, 64), (2, 1, 33)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("used", ["both", "norm_only"])
def test_residual_add_fused_into_the_norm_matches_add_then_norm(dtypes, shape, kind, used):
    """(x + r, norm(x + r)) from one kernel = torch's add then the reference norm: the sum exactly (torch's promoted
    dtype), the norm and the gradients of x, r, w (, b) — with the sum also used downstream (its gradient added to
    the norm's in the kernel) or only through the norm. fp32 at 1e-5; fp16 within a rounding of the fp16 values."""
    torch.manual_seed(sum(shape))
    d = shape[-1]
    x = torch.randn(*shape, dtype=dtypes[0], requires_grad=True)
    r = torch.randn(*shape, dtype=dtypes[1], requires_grad=True)
    w = (1 + 0.1 * torch.randn(d)).requires_grad_()
    b = (0.1 * torch.randn(d)).requires_grad_()
    if kind == "rms":
        (s, y), (s_ref, y_ref) = norms.add_rms_norm(x, r, w, 1e-6), reference.add_rms_norm(x, r, w, 1e-6)
        inputs = (x, r, w)
    else:
        (s, y), (s_ref, y_ref) = norms.add_layer_norm(x, r, w, b, 1e-5), reference.add_layer_norm(x, r, w, b, 1e-5)
        inputs = (x, r, w, b)
    assert s.dtype == s_ref.dtype and y.dtype == y_ref.dtype
    assert torch.equal(s, s_ref)
    half = torch.float16 in (s.dtype, y.dtype)
    tol = dict(atol=2e-3, rtol=2e-3) if half else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    ds, dy = torch.randn_like(s), torch.randn_like(y)

    def loss(s, y):
        return (y.float() * dy.float()).sum() + ((s.float() * ds.float()).sum() if used == "both" else 0)

    got, want = torch.autograd.grad(loss(s, y), inputs), torch.autograd.grad(loss(s_ref, y_ref), inputs)
    for g, ref in zip(got, want):
        assert g.dtype == ref.dtype
        fp16 = half or g.dtype == torch.float16  # one fp16 rounding of an fp32 sum apart at most
        torch.testing.assert_close(g, ref, **(dict(atol=1e-2, rtol=1e-2) if fp16 else dict(atol=1e-4, rtol=1e-4)))


def test_residual_add_fused_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"residual add: shapes \(4, 32\) and \(4, 16\) differ"):
        norms.add_rms_norm(torch.randn(4, 32), torch.randn(4, 16), torch.ones(32))


@pytest.mark.gpu
def test_the_torch_rms_norm_reaches_the_fused_cuda_kernel_under_bf16_autocast():
    """model.kernels = "torch": the block's norm under bf16 autocast (bf16 input, fp32 parameter) dispatches torch's
    fused rms_norm forward and backward, not its pow / mean / rsqrt / mul decomposition — the dispatch is
    inspected, not timed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.models.layers import RMSNorm
    from pretrain.models.ops import Ops

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    norm = RMSNorm(2048, 1e-6, Ops()).cuda()
    x = torch.randn(4, 256, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with Recorder() as mode:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = norm(x)
        y.float().sum().backward()
    assert {"aten::_fused_rms_norm", "aten::_fused_rms_norm_backward"} <= mode.seen, sorted(mode.seen)
    assert "aten::pow" not in mode.seen and norm.weight.grad.dtype == torch.float32
