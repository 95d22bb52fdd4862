import torch

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.flops import num_params


def bert_cfg(*extra):
    return load_config(None, ["model.arch=bert", "model.n_layers=2", "model.d_model=48", "model.n_heads=4",
                              "model.vocab_size=101", "model.seq_len=37", "model.max_position_embeddings=64",
                              "model.norm_eps=1e-12", *extra]).model


def test_param_count_matches_closed_form():
    for extra in ([], ["model.nsp_head=true"]):
        cfg = bert_cfg(*extra)
        assert sum(p.numel() for p in build_model(cfg).parameters()) == num_params(cfg)
    base = load_config(None, ["model.arch=bert", "model.n_layers=12", "model.d_model=768", "model.n_heads=12",
                              "model.ffn_hidden=3072", "model.vocab_size=30522", "model.seq_len=512"]).model
    # transformers' BertForMaskedLM(BertConfig()) holds 109,514,298 (no pooler in MLM-only mode)
    assert num_params(base) == 109_514_298


def test_padding_changes_no_real_output():
    torch.manual_seed(0)
    model = build_model(bert_cfg()).eval()
    tokens = torch.randint(7, 101, (2, 37))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, 12:] = False
    other = tokens.clone()
    other[0, 30:] = torch.randint(7, 101, (7,))
    other[1, 12:] = torch.randint(7, 101, (25,))
    a, b = model(tokens, mask), model(other, mask)
    torch.testing.assert_close(a[0, :30], b[0, :30], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1, :12], b[1, :12], rtol=0, atol=1e-5)
    # without the mask the padding does leak into real positions
    assert (model(tokens)[1, :12] - model(other)[1, :12]).abs().max() > 1e-4


def test_bidirectional_and_nsp():
    torch.manual_seed(0)
    model = build_model(bert_cfg("model.nsp_head=true")).eval()
    tokens = torch.randint(7, 101, (2, 37))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 101
    assert (model(tokens)[:, 0] - model(changed)[:, 0]).abs().max() > 1e-4  # the future is visible
    mlm, nsp = model.mlm_and_nsp(tokens)
    assert mlm.shape == (2, 37, 101) and nsp.shape == (2, 2)


def test_mlm_decoder_is_tied_to_embeddings():
    model = build_model(bert_cfg())
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n for n in names)
    tokens = torch.randint(7, 101, (1, 10))
    model(tokens).sum().backward()
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
