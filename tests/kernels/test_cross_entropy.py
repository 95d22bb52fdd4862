import pytest
import torch

from kernels import reference

ce = pytest.importorskip("kernels.cross_entropy")


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
    # 4096 tokens, vocab 32768, dim 64: chunks of 8 rows -> 1 MiB of logits at a time instead of 512 MiB
    assert ce.chunk_size(4096, 64, 32768) == 8
    assert ce.chunk_size(3, 4096, 1000) == 4  # vocab below the dim: one chunk holds every token


def test_all_ignored_and_bad_inputs():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    loss = ce.linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match=r"takes hidden \(N, D\) and weight \(V, D\)"):
        ce.linear_cross_entropy(hidden, torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be integer"):
        ce.linear_cross_entropy(hidden, weight, torch.zeros(4))
