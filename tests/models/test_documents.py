"""Document masking's defining property: a packed sequence of documents with ``document_ids`` (and positions
restarting at each document) gives every document the logits and the parameter gradients it gets alone — per
backend (torch SDPA with a dense mask; the Triton kernels in the interpreter), causal GPT (both flavours) and
bidirectional BERT, GQA, head dims 64 and 96, documents of one token and of the whole sequence."""

import pytest
import torch

from pretrain.config import load_config
from pretrain.models import build_model

from ..kernels.test_attention import _documents


def _cfg(arch, flavor, kernels, head_dim, kv_heads, t):
    heads = 2
    return load_config(None, [f"model.arch={arch}", f"model.flavor={flavor}", "model.n_layers=2",
                              f"model.d_model={heads * head_dim}", f"model.n_heads={heads}",
                              f"model.n_kv_heads={kv_heads}", "model.vocab_size=64", f"model.seq_len={t}",
                              f"model.kernels={kernels}", "model.ffn_hidden=64"]).model


def _positions(ids: torch.Tensor) -> torch.Tensor:
    t = torch.arange(ids.shape[1]).expand_as(ids)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return t - torch.where(new, t, 0).cummax(dim=1).values


def _run(model, arch, tokens, ids=None, positions=None):
    if arch == "bert":
        return model(tokens, torch.ones_like(tokens), document_ids=ids, positions=positions)
    return model(tokens, document_ids=ids, positions=positions)


CASES = [  # (arch, flavor, head dim, kv heads, T, document lengths)
    ("gpt", "llama", 64, 1, 40, [1, 13, 9, 17]),   # GQA 2:1, a one-token document
    ("gpt", "llama", 96, 2, 24, [24]),             # one document: the plain causal model
    ("gpt", "gpt2", 64, 0, 32, [5, 20, 7]),        # learned positions restart too
    ("bert", "llama", 64, 0, 30, [11, 1, 18]),     # bidirectional
    ("bert", "llama", 96, 0, 20, [7, 13]),
]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("arch, flavor, head_dim, kv_heads, t, lengths", CASES)
def test_each_packed_document_equals_itself_alone(kernels, arch, flavor, head_dim, kv_heads, t, lengths):
    if kernels == "triton":
        pytest.importorskip("pretrain.kernels.attention")
    torch.manual_seed(0)
    model = build_model(_cfg(arch, flavor, kernels, head_dim, kv_heads, t)).double() if kernels == "torch" else \
        build_model(_cfg(arch, flavor, kernels, head_dim, kv_heads, t))
    ids = _documents(1, t, lengths)
    tokens = torch.randint(8, 64, (1, t))
    packed = _run(model, arch, tokens, ids, _positions(ids))
    weights = torch.randn_like(packed)
    packed_grads = torch.autograd.grad((packed * weights).sum(), list(model.parameters()), allow_unused=True)

    alone_grads = None
    for doc in ids.unique():
        where = (ids[0] == doc).nonzero().flatten()
        span = slice(int(where[0]), int(where[-1]) + 1)
        alone = _run(model, arch, tokens[:, span])
        torch.testing.assert_close(packed[:, span], alone, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad((alone * weights[:, span]).sum(), list(model.parameters()), allow_unused=True)
        alone_grads = grads if alone_grads is None else [
            a if g is None else g if a is None else a + g for a, g in zip(alone_grads, grads)]
    for (name, _), a, b in zip(model.named_parameters(), packed_grads, alone_grads):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if lengths == [t]:  # one document spanning the row is exactly the model without documents
        torch.testing.assert_close(packed, _run(model, arch, tokens), atol=0, rtol=0)


def test_without_document_ids_documents_see_each_other():
    """The control: the same packed row without ``document_ids`` lets the second document attend to the first
    (what masking removes), so the property above is not a test that cannot fail."""
    torch.manual_seed(0)
    model = build_model(_cfg("gpt", "llama", "torch", 64, 1, 20)).double()
    ids = _documents(1, 20, [8, 12])
    tokens = torch.randint(8, 64, (1, 20))
    alone = model(tokens[:, 8:])
    unmasked = model(tokens, positions=_positions(ids))
    assert (unmasked[:, 8:] - alone).abs().max() > 1e-3


def test_flex_attention_block_mask_equals_the_dense_mask():
    """The torch path's CUDA route (FlexAttention's block mask from the ids, causality and key padding) gives the
    dense mask's outputs — checked here eagerly, forward only (FlexAttention has no CPU backward); the gpu-marked
    test below runs it compiled, forward and backward."""
    from pretrain.models.ops import flex_documents, torch_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 48, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16)
    ids = _documents(2, 48, [1, 20, 7, 13])
    pad = torch.arange(48)[None] < torch.tensor([[48], [40]])
    for causal, mask in ((True, None), (False, pad)):
        flex = flex_documents(q, k, v, causal, mask, ids, compiled=False)
        dense = torch_attention(q, k, v, causal=causal, key_padding_mask=mask, document_ids=ids)
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_flex_attention_on_cuda_matches_the_dense_mask_forward_and_backward():
    from pretrain.kernels import reference
    from pretrain.models.ops import flex_documents

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 256, 64, device="cuda", requires_grad=True) for n in (8, 2, 2))
    ids = _documents(2, 256, [1, 100, 37, 64]).cuda()
    flex = flex_documents(q, k, v, True, None, ids)
    grads = torch.autograd.grad(flex.sum(), (q, k, v))
    dense = reference.attention(q, k, v, causal=True, document_ids=ids)  # torch_attention on CUDA is flex itself
    for a, b in zip(grads, torch.autograd.grad(dense.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(flex, dense, atol=2e-4, rtol=2e-4)
