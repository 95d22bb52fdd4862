import pytest
import torch

from pretrain.kernels import reference

ce = pytest.importorskip("pretrain.kernels.cross_entropy")


@pytest.mark.parametrize("n, d, v", [(37, 48, 1000), (1, 32, 50257), (130, 80, 1000)])
@pytest.mark.parametrize("z_loss, smoothing", [(0.0, 0.0), (1e-3, 0.1)])
def test_linear_cross_entropy_matches_reference(n, d, v, z_loss, smoothing):
    torch.manual_seed(n + v)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (0.05 * torch.randn(v, d)).requires_grad_()
    targets = torch.randint(0, v, (n,))
    if n > 2:
        targets[::3] = -100  # ignored positions
    ours = ce.linear_cross_entropy(hidden, weight, targets, z_loss=z_loss, label_smoothing=smoothing)
    ref = reference.linear_cross_entropy(hidden, weight, targets, z_loss=z_loss, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(ours * 1.7, (hidden, weight))
    want = torch.autograd.grad(ref * 1.7, (hidden, weight))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_chunks_bound_the_logits_memory():
    # the logits chunk is about the size of the hidden states: (N, max(1024, D)) columns at a time, not (N, V)
    assert ce.vocab_chunk(4096, 64, 32768) == 1024
    assert ce.vocab_chunk(4096, 4096, 128256) == 4096
    assert ce.vocab_chunk(3, 4096, 1000) == 1000  # vocab below the chunk: one chunk holds it all


def test_half_precision_matmuls_and_no_fp32_weight_copy():
    """bf16 inputs: every matmul takes bf16 operands and nothing (V, D)-sized is made in fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.calls.append((str(func), [t.dtype for t in tensors],
                               [(o.dtype, o.numel()) for o in outs if isinstance(o, torch.Tensor)]))
            return out

    torch.manual_seed(0)
    n, d, v = 16, 32, 3000
    hidden = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.05 * torch.randn(v, d)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,))
    with Record() as record:  # the op's body: the custom op itself is opaque to a dispatch mode
        with torch.no_grad():
            loss, grad_hidden, grad_weight = ce.forward_and_gradients(hidden, weight, targets, -100, 0.0, 0.0)
    matmuls = [c for c in record.calls if c[0].split(".")[1] in ("mm", "addmm", "matmul")]
    assert matmuls and all(dt == torch.bfloat16 for _, dtypes, _ in matmuls for dt in dtypes), matmuls
    big_fp32 = [c for c in record.calls for dt, numel in c[2] if dt == torch.float32 and numel >= v * d]
    assert not big_fp32, big_fp32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = reference.linear_cross_entropy(h32, w32, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad_hidden.float(), h32.grad, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(grad_weight.float(), w32.grad, atol=2e-3, rtol=5e-2)


def test_all_ignored_and_bad_inputs():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    loss = ce.linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match=r"takes hidden \(N, D\) and weight \(V, D\)"):
        ce.linear_cross_entropy(hidden, torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be integer"):
        ce.linear_cross_entropy(hidden, weight, torch.zeros(4))


@pytest.mark.parametrize("bad", [10, 11, -1, -7])
def test_a_target_outside_the_vocabulary_is_refused_not_a_wrong_loss(bad):
    """torch's cross_entropy raises for a target >= V (or a negative one other than ignore_index); the fused
    kernel must too, instead of reading a neighbour's logit."""
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.tensor([1, bad, 3, -100])
    with pytest.raises(RuntimeError, match=r"a target is outside the vocabulary \[0, 10\)"):
        ce.linear_cross_entropy(hidden, weight, targets)
    with pytest.raises((IndexError, RuntimeError)):
        torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    assert ce.linear_cross_entropy(hidden, weight, torch.tensor([1, 9, 0, -100])).isfinite()
