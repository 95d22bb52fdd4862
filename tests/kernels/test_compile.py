"""Every kernel launch is a torch.library custom op: torch.compile traces through the kernels' autograd
Functions (dynamo + AOT autograd) without graph breaks, and gives the eager values."""

import pytest
import torch

pytest.importorskip("triton")

from pretrain.kernels.attention import flash_attention  # noqa: E402
from pretrain.kernels.cross_entropy import linear_cross_entropy  # noqa: E402
from pretrain.kernels.norms import layer_norm, rms_norm  # noqa: E402
from pretrain.kernels.rotary import rotary  # noqa: E402


def block(x, w, b, q, cos, sin, head, targets):
    h = layer_norm(rms_norm(x, w), w, b)
    a = flash_attention(rotary(q, cos, sin), q * 0.5, q + 1.0, causal=True)
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), head, targets) + a.square().mean()


def inputs():
    torch.manual_seed(0)
    return (torch.randn(2, 5, 32, requires_grad=True), torch.rand(32) + 0.5, torch.randn(32),
            torch.randn(1, 2, 16, 32, requires_grad=True), torch.randn(16, 32), torch.randn(16, 32),
            torch.randn(100, 32, requires_grad=True), torch.randint(0, 100, (10,)))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_kernels_match_eager(backend):
    args = inputs()
    eager = block(*args)
    eager_grads = torch.autograd.grad(eager, (args[0], args[3], args[6]))
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out = compiled(*args)
    grads = torch.autograd.grad(out, (args[0], args[3], args[6]))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
