import pytest
import torch

from pretrain.kernels import reference
from pretrain.models.layers import Rotary

rotary = pytest.importorskip("pretrain.kernels.rotary")


@pytest.mark.parametrize("shape", [(2, 3, 37, 48), (1, 2, 1, 80), (1, 1, 130, 32)])
def test_rotary_matches_reference_and_the_model(shape):
    torch.manual_seed(shape[2])
    x = torch.randn(*shape, requires_grad=True)
    tables = Rotary(shape[-1], 10000.0, 256)
    ours = rotary.rotary(x, tables.cos, tables.sin)
    ref = reference.rotary(x, tables.cos[:shape[2]], tables.sin[:shape[2]])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    model_q, _ = tables(x.detach(), x.detach())  # the model's own rotation, same convention
    torch.testing.assert_close(ours.detach(), model_q, atol=1e-5, rtol=1e-5)
    dy = torch.randn(*shape)
    torch.testing.assert_close(torch.autograd.grad(ours, x, dy)[0], torch.autograd.grad(ref, x, dy)[0],
                               atol=1e-5, rtol=1e-5)


def test_rotary_bad_inputs():
    with pytest.raises(ValueError, match="even E"):
        rotary.rotary(torch.randn(1, 1, 4, 5), torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="rotary tables must be"):
        rotary.rotary(torch.randn(1, 1, 8, 4), torch.randn(4, 4), torch.randn(4, 4))


def test_rotary_with_arbitrary_tables():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 9, 16, requires_grad=True)
    cos, sin = torch.randn(9, 16), torch.randn(9, 16)
    ours, ref = rotary.rotary(x, cos, sin), reference.rotary(x, cos, sin)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, dy)[0], torch.autograd.grad(ref, x, dy)[0],
                               atol=1e-5, rtol=1e-5)


def test_rotary_with_one_table_a_row():
    """Positions restarting at each packed document: (B, 1, T, E) tables, one a row, as the model gathers them —
    forward and backward equal the reference broadcasting the same tables."""
    torch.manual_seed(4)
    tables = Rotary(32, 10000.0, 64)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]])
    x = torch.randn(2, 11, 3, 32).transpose(1, 2).requires_grad_()
    cos, sin = tables.cos[positions][:, None], tables.sin[positions][:, None]
    ours, ref = rotary.rotary(x, cos, sin), reference.rotary(x, cos, sin)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, tables(x, x, positions)[0], atol=1e-5, rtol=1e-5)  # the model's torch path
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, dy)[0], torch.autograd.grad(ref, x, dy)[0],
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"per-row rotary tables must be \(2, 1, 11, 32\)"):
        rotary.rotary(x, cos[:1], sin[:1])


def test_rotary_reads_and_keeps_the_models_transposed_layout():
    """q as the model makes it, a (B, H, T, E) view of (B, T, H, E): no copy in, the same layout out."""
    torch.manual_seed(1)
    b, t, h, e = 2, 37, 3, 16
    x = torch.randn(b, t, h * e).view(b, t, h, e).transpose(1, 2).requires_grad_()
    tables = Rotary(e, 10000.0, 64)
    ours = rotary.rotary(x, tables.cos, tables.sin)
    assert ours.stride() == x.stride()  # (B, T, H, E) memory: the reshape back to (B, T, H·E) is free
    ref = reference.rotary(x, tables.cos[:t], tables.sin[:t])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn(b, t, h, e).transpose(1, 2)  # a strided incoming gradient too
    torch.testing.assert_close(torch.autograd.grad(ours, x, dy)[0], torch.autograd.grad(ref, x, dy)[0],
                               atol=1e-5, rtol=1e-5)
