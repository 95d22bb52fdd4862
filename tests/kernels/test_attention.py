import pytest
import torch

from pretrain.kernels import reference

attention = pytest.importorskip("pretrain.kernels.attention")

CASES = [  # (B, H, K, T, E, causal, padded, layout)
    (1, 2, 2, 37, 48, True, False, "bhte"),
    (2, 4, 2, 37, 32, False, True, "bthe"),    # GQA 2:1, padding, bidirectional (BERT), the model's layout
    (1, 2, 1, 1, 80, True, False, "bthe"),     # one token, MQA
    (1, 1, 1, 130, 16, True, True, "bhte"),    # several blocks, causal + padding
    (1, 2, 2, 20, 96, False, False, "bhte"),
    (1, 8, 1, 29, 64, True, False, "bthe"),    # GQA 8:1, T not a multiple of any block
    (2, 4, 1, 129, 16, True, False, "bthe"),   # GQA 4:1, causal split with a partial last block
    (1, 2, 2, 37, 128, True, True, "bthe"),
    (1, 1, 1, 17, 256, True, False, "bhte"),
    (1, 1, 1, 18, 256, False, True, "bthe"),
]


def _qkv(b, h, kv, t, e, layout):
    """q (B, H, T, E) and k, v (B, K, T, E); "bthe" makes them as the model does: transposed views of one
    (B, T, H + 2K, E) projection, so every stride but the last is foreign."""
    if layout == "bhte":
        return (torch.randn(b, n, t, e, requires_grad=True) for n in (h, kv, kv))
    x = torch.randn(b, t, h + 2 * kv, e)
    return (y.transpose(1, 2).requires_grad_() for y in x.split([h, kv, kv], dim=2))


@pytest.mark.parametrize("b, h, kv, t, e, causal, padded, layout", CASES)
def test_flash_attention_matches_reference(b, h, kv, t, e, causal, padded, layout):
    torch.manual_seed(t * e + h)
    q, k, v = _qkv(b, h, kv, t, e, layout)
    mask = None
    if padded:
        lengths = torch.randint(max(1, t // 2), t + 1, (b,))
        mask = torch.arange(t)[None, :] < lengths[:, None]
    ours = attention.flash_attention(q, k, v, causal=causal, key_padding_mask=mask)
    ref = reference.attention(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert ours.transpose(1, 2).is_contiguous()  # written (B, T, H, E): the model's reshape is a view
    dout = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, r in zip("qkv", got, want):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"d{n}: {m}")


SHAPES = [  # (B, H, K, T, E, causal, padded, layout)
    (1, 4, 2, 1, 64, True, False, "bthe"),      # one token, GQA
    (2, 4, 2, 17, 128, True, False, "bthe"),    # GQA 2:1, causal
    (1, 2, 2, 129, 64, False, True, "bhte"),    # bidirectional, padded, a partial last block
    (1, 2, 1, 17, 256, True, False, "bthe"),    # the widest head, MQA
]


@pytest.mark.parametrize("kind, b, h, kv, t, e, causal, padded, layout",
                         [(kind, *shape) for kind in ("one_pass", "split") for shape in SHAPES])
def test_both_backwards_match_the_reference(monkeypatch, kind, b, h, kv, t, e, causal, padded, layout):
    """The one-pass backward (dQ added atomically by the dK/dV kernel) and the split one (a dQ kernel of its own)
    give the reference's dq, dk, dv."""
    monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", kind)
    test_flash_attention_matches_reference(b, h, kv, t, e, causal, padded, layout)


def _documents(b, t, lengths):
    """(B, T) document ids: row r cut into documents of the given lengths (cycled), the last one cut at T."""
    rows = []
    for r in range(b):
        ids, doc, i = [], 0, 0
        while len(ids) < t:
            ids += [doc] * lengths[(i + r) % len(lengths)]
            doc, i = doc + 1, i + 1
        rows.append(ids[:t])
    return torch.tensor(rows)


DOC_CASES = [  # (B, H, K, T, E, causal, padded, document lengths)
    (2, 4, 2, 70, 64, True, False, [1, 30, 5, 17]),     # GQA, a one-token document, boundaries inside blocks
    (1, 2, 2, 64, 96, False, False, [16, 40, 8]),       # bidirectional (BERT), boundaries on block edges
    (2, 2, 1, 53, 32, False, True, [7, 3, 25]),         # bidirectional with padding, MQA
    (1, 2, 2, 37, 64, True, False, [37]),               # one document: plain causal
    (1, 1, 1, 40, 16, True, False, [1]),                # every token its own document
]


@pytest.mark.parametrize("kind", ["one_pass", "split"])
@pytest.mark.parametrize("b, h, kv, t, e, causal, padded, lengths", DOC_CASES)
def test_document_masking_matches_the_reference(monkeypatch, kind, b, h, kv, t, e, causal, padded, lengths):
    """With document ids a query sees only its own document: outputs and dq, dk, dv equal the reference's
    (a dense same-document mask), for both backwards."""
    monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", kind)
    torch.manual_seed(t + e)
    q, k, v = _qkv(b, h, kv, t, e, "bthe")
    ids = _documents(b, t, lengths)
    mask = torch.arange(t)[None, :] < torch.tensor([t - 5 * i for i in range(b)])[:, None] if padded else None
    ours = attention.flash_attention(q, k, v, causal=causal, key_padding_mask=mask, document_ids=ids)
    ref = reference.attention(q, k, v, causal=causal, key_padding_mask=mask, document_ids=ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    dout = torch.randn_like(ours)
    for name, g, r in zip("qkv", torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"d{n}: {m}")
    if lengths == [t]:  # one document is no document
        torch.testing.assert_close(ours, attention.flash_attention(q, k, v, causal=causal), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["one_pass", "split"])
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_documents_are_never_read(monkeypatch, kind, causal):
    """The kernels skip the key (and, backward, query) blocks that lie wholly in other documents: NaN planted
    there — which any load into a matmul would spread (0 · NaN = NaN) — leaves the other documents' outputs and
    gradients finite and equal to the reference's. Interpreter blocks are 16 tokens: document 0 is tokens 0–39,
    document 1 is 40–95, so blocks 0–15 and 16–31 lie wholly in document 0 and blocks 48 on wholly in 1."""
    monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", kind)
    torch.manual_seed(0)
    t, e = 96, 32
    ids = torch.tensor([[0] * 40 + [1] * 56])
    q, k, v = (torch.randn(1, 2, t, e) for _ in range(3))
    clean = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*clean, causal=causal, document_ids=ids)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, clean, dout)

    poisoned = [x.clone() for x in (q, k, v)]
    for x in poisoned[1:]:  # keys and values of the blocks wholly in document 0
        x[:, :, :32] = float("nan")
    poisoned = [x.requires_grad_() for x in poisoned]
    out = attention.flash_attention(*poisoned, causal=causal, document_ids=ids)
    rows = slice(48, t)  # query blocks wholly in document 1
    torch.testing.assert_close(out[:, :, rows], ref[:, :, rows], atol=1e-4, rtol=1e-4)

    # backward: dK/dV of document 0's key blocks read only document 0's query blocks; poison the query side of
    # the blocks wholly in document 1 (q, and the output gradient)
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    out2 = attention.flash_attention(q2, k2, v2, causal=causal, document_ids=ids)
    bad_dout = dout.clone()
    bad_dout[:, :, 48:] = float("nan")
    with torch.no_grad():
        q2.data[:, :, 48:] = float("nan")
    dq, dk, dv = torch.autograd.grad(out2, (q2, k2, v2), bad_dout)
    keys = slice(0, 32)
    torch.testing.assert_close(dk[:, :, keys], ref_grads[1][:, :, keys], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(dv[:, :, keys], ref_grads[2][:, :, keys], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(dq[:, :, keys], ref_grads[0][:, :, keys], atol=2e-4, rtol=2e-4)



VALUE_CASES = [  # (B, H, K, T, E, Ev, causal, padded, document lengths): the value head dim ≠ the query/key one
    (1, 2, 2, 37, 192, 128, True, False, None),       # DeepSeek-V3's MLA heads (256 / 128 registers)
    (1, 2, 2, 45, 192, 128, True, False, [9, 30]),    # ... with packed documents
    (2, 2, 1, 29, 48, 40, False, True, None),         # a non-power-of-two pair, bidirectional, padded, MQA
    (1, 4, 2, 33, 24, 56, True, False, [5, 17]),      # the value wider than the query/key, GQA, documents
]


@pytest.mark.parametrize("kind", ["one_pass", "split"])
@pytest.mark.parametrize("b, h, kv, t, e, ev, causal, padded, lengths", VALUE_CASES)
def test_a_value_head_dim_other_than_the_query_key_one(monkeypatch, kind, b, h, kv, t, e, ev, causal, padded,
                                                       lengths):
    """q, k (·, E) and v (·, Ev) with E ≠ Ev (multi-head latent attention): the output (B, H, T, Ev), stored
    (B, T, H, Ev), and dq, dk, dv equal the reference's and torch's SDPA (the model's torch backend)."""
    from pretrain.models.ops import torch_attention

    monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", kind)
    torch.manual_seed(t + e + ev)
    x = torch.randn(b, t, h + kv, e)  # q and k as the model makes them: transposed views of one projection
    q, k = (y.transpose(1, 2).requires_grad_() for y in x.split([h, kv], dim=2))
    v = torch.randn(b, t, kv, ev).transpose(1, 2).requires_grad_()
    ids = _documents(b, t, lengths) if lengths else None
    mask = torch.arange(t)[None, :] < torch.tensor([t - 6 * i for i in range(b)])[:, None] if padded else None
    ours = attention.flash_attention(q, k, v, causal=causal, key_padding_mask=mask, document_ids=ids, scale=0.11)
    ref = reference.attention(q, k, v, causal=causal, key_padding_mask=mask, document_ids=ids, scale=0.11)
    assert ours.shape == (b, h, t, ev) and ours.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    if not padded:  # SDPA's padded rows differ (it keeps no row empty); the reference covers them
        sdpa = torch_attention(q, k, v, causal=causal, document_ids=ids, scale=0.11)
        torch.testing.assert_close(ours, sdpa, atol=1e-4, rtol=1e-4)
    dout = torch.randn_like(ours)
    for name, g, r in zip("qkv", torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"d{n}: {m}")

def test_document_bounds():
    ids = torch.tensor([[5, 5, 5, 2, 2, 9], [0, 1, 2, 3, 4, 5], [7, 7, 7, 7, 7, 7]])
    starts, ends = attention.document_bounds(ids)
    assert starts.tolist() == [[0, 0, 0, 3, 3, 5], [0, 1, 2, 3, 4, 5], [0] * 6]
    assert ends.tolist() == [[3, 3, 3, 5, 5, 6], [1, 2, 3, 4, 5, 6], [6] * 6]
    with pytest.raises(ValueError, match=r"document_ids must be integers \(B, T\) = \(1, 8\)"):
        q = torch.randn(1, 1, 8, 16)
        attention.flash_attention(q, q, q, document_ids=torch.zeros(1, 7, dtype=torch.long))


def test_the_backwards_agree_and_a_bad_choice_is_refused(monkeypatch):
    torch.manual_seed(0)
    q, k, v = _qkv(1, 4, 1, 40, 48, "bthe")
    dout = torch.randn(1, 4, 40, 48)
    grads = {}
    for kind in ("one_pass", "split"):
        monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", kind)
        grads[kind] = torch.autograd.grad(attention.flash_attention(q, k, v), (q, k, v), dout)
    for a, c in zip(grads["one_pass"], grads["split"]):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
    monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", "fast")
    with pytest.raises(ValueError, match="PRETRAIN_ATTENTION_BACKWARD = 'fast' is not one of one_pass, split"):
        attention.flash_attention(q, k, v).sum().backward()


def test_scale_and_the_torch_backend_agree():
    from pretrain.models.ops import torch_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 32) for _ in range(3))
    torch.testing.assert_close(attention.flash_attention(q, k, v, scale=0.3),
                               torch_attention(q, k, v, causal=True, scale=0.3), atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    q = torch.randn(1, 4, 8, 32)
    with pytest.raises(ValueError, match="K dividing H"):
        attention.flash_attention(q, torch.randn(1, 3, 8, 32), torch.randn(1, 3, 8, 32))
    with pytest.raises(ValueError, match="head dim 320 exceeds"):
        big = torch.randn(1, 1, 4, 320)
        attention.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="value head dim 288 exceeds"):
        attention.flash_attention(q, q, torch.randn(1, 4, 8, 288))
    with pytest.raises(ValueError, match=r"v \(B, K, T, Ev\)"):
        attention.flash_attention(q, q, torch.randn(1, 4, 7, 16))
    with pytest.raises(TypeError, match="dtypes differ"):
        attention.flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="no dropout"):
        attention.flash_attention(q, q, q, dropout_p=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["one_pass", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attention_half_precision_on_cuda(monkeypatch, dtype, kind):
    """Both backwards on the GPU, at 1000 tokens (not a multiple of any tile; 63 key blocks of the interpreter's
    16 take ~30 s a pass on a CPU, so the long case runs here) and 1024, GQA 8:2."""
    monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", kind)
    for t in (1000, 1024):
        q = torch.randn(2, 8, t, 128, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, 2, t, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        ours = attention.flash_attention(q, k, v)
        ref = reference.attention(q, k, v)
        torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)
        dout = torch.randn_like(ours)
        for g, r in zip(torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
            torch.testing.assert_close(g, r, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["one_pass", "split"])
def test_mla_head_dims_in_bf16_on_cuda(monkeypatch, kind):
    """DeepSeek-V3's MLA heads (q/k 192, v 128: the 192 candidate lists) in bf16 on the GPU, causal, with packed
    documents, at 1000 tokens, against the fp32 reference."""
    monkeypatch.setenv("PRETRAIN_ATTENTION_BACKWARD", kind)
    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 1000, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = _documents(2, 1000, [300, 450, 250]).cuda()
    ours = attention.flash_attention(q, k, v, document_ids=ids)
    ref = reference.attention(q, k, v, document_ids=ids)
    assert ours.shape == (2, 4, 1000, 128)
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)
    dout = torch.randn_like(ours)
    for g, r in zip(torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [16, 4])
def test_the_torch_attention_path_reaches_flash_or_cudnn_in_bf16(kv_heads):
    """model.kernels = "torch" on CUDA: a GPT attention layer under bf16 autocast (gpt_1b's heads, MHA and GQA),
    forward and backward, with SDPA restricted to its FlashAttention and cuDNN backends. SDPA raises ("No
    available kernel") when the inputs only fit the math or memory-efficient kernels: the dispatch is inspected,
    not timed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.config import load_config
    from pretrain.models.gpt import GPT

    cfg = load_config(None, ["model.kernels=torch", "model.n_layers=1", "model.d_model=2048", "model.n_heads=16",
                             f"model.n_kv_heads={kv_heads}", "model.vocab_size=128", "model.seq_len=1024"]).model
    model = GPT(cfg).cuda()
    tokens = torch.randint(0, 128, (2, 1024), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, tokens)
        loss.backward()
    assert torch.isfinite(loss) and model.layers["0"].self_attn.q_proj.weight.grad is not None


def test_the_meter_reads_each_backward():
    """What the step-cost meter is told: one pass does FlashAttention-2's 5 matmuls a block pair (2.5× the
    forward), the split backward 7 (3.5×)."""
    q, k, v, out, dout = (torch.zeros(1, 2, 32, 16) for _ in range(5))
    lse, mask = torch.zeros(1, 2, 32), torch.zeros(1, dtype=torch.int8)
    fwd = attention._fwd_cost((q, k, v, mask, True), {}, (out, lse))
    for one_pass, ratio in ((True, 2.5), (False, 3.5)):
        bwd = attention._bwd_cost((q, k, v, out, lse, mask, dout, True, False, 0.25, one_pass), {}, (q, k, v))
        assert bwd["flops"] / fwd["flops"] == pytest.approx(ratio)
    # a value head dim of 8 beside the query/key one of 16: S, dK, dQ scale with 16, PV, dP, dV with 8
    v8, out8, dout8 = (torch.zeros(1, 2, 32, 8) for _ in range(3))
    fwd8 = attention._fwd_cost((q, k, v8, mask, True), {}, (out8, lse))
    assert fwd8["flops"] == pytest.approx(fwd["flops"] * (16 + 8) / 32)
    for one_pass, matmuls in ((True, 3 * 16 + 2 * 8), (False, 4 * 16 + 3 * 8)):
        bwd = attention._bwd_cost((q, k, v8, out8, lse, mask, dout8, True, False, 0.25, one_pass), {}, (q, k, v8))
        assert bwd["flops"] == pytest.approx(fwd["flops"] / 32 * matmuls)
