import pytest
import torch

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.flops import num_params
from pretrain.models.ops import torch_attention


def gpt_cfg(*extra, flavor="llama"):
    return load_config(None, [f"model.flavor={flavor}", "model.n_layers=2", "model.d_model=48", "model.n_heads=4",
                              "model.vocab_size=101", "model.seq_len=37", *extra]).model


@pytest.mark.parametrize("flavor, extra", [("llama", ["model.n_kv_heads=2"]), ("llama", ["model.tie_embeddings=true"]),
                                           ("gpt2", ["model.tie_embeddings=true"]), ("gpt2", [])])
def test_param_count_matches_closed_form(flavor, extra):
    cfg = gpt_cfg(*extra, flavor=flavor)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


def test_known_sizes():
    gpt2_small = load_config(None, ["model.flavor=gpt2", "model.n_layers=12", "model.d_model=768", "model.n_heads=12",
                                    "model.vocab_size=50257", "model.seq_len=1024", "model.tie_embeddings=true"]).model
    assert num_params(gpt2_small) == 124_439_808  # GPT-2 small as published by HF
    llama7b = load_config(None, ["model.n_layers=32", "model.d_model=4096", "model.n_heads=32", "model.ffn_hidden=11008",
                                 "model.vocab_size=32000"]).model
    assert num_params(llama7b) == 6_738_415_616  # Llama-2-7B


@pytest.mark.parametrize("flavor", ["llama", "gpt2"])
def test_causality(flavor):
    torch.manual_seed(0)
    model = build_model(gpt_cfg("model.n_kv_heads=2" if flavor == "llama" else "model.n_kv_heads=0", flavor=flavor))
    tokens = torch.randint(0, 101, (2, 37))
    changed = tokens.clone()
    changed[:, 20:] = torch.randint(0, 101, (2, 17))
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 37, 101)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_residual_init_is_scaled():
    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.n_layers=8", "model.d_model=256", "model.n_heads=4"]).model)
    std_q = model.layers["0"].self_attn.q_proj.weight.std().item()
    std_o = model.layers["0"].self_attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 1e-3
    assert abs(std_o - 0.02 / 4) < 3e-4  # 1/sqrt(2 * 8 layers)


def test_gqa_attention_equals_repeated_kv():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True)
    torch.testing.assert_close(torch_attention(q, k, v, causal=True), expected)


def test_matches_hf_llama_logits():
    """Same weights in transformers' LlamaForCausalLM give the same logits: RoPE, RMSNorm, SwiGLU, GQA agree."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = gpt_cfg("model.n_kv_heads=2", "model.rope_theta=500000.0")
    ours = build_model(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_generate_greedy_and_sampled():
    torch.manual_seed(0)
    model = build_model(gpt_cfg())
    prompt = torch.randint(0, 101, (2, 5))
    greedy = model.generate(prompt, 8)
    assert greedy.shape == (2, 13) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 8))
    # greedy picks the argmax at each position
    logits = model(greedy[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), greedy[:, 5:])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=g1)
    s2 = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=g2)
    assert torch.equal(s1, s2)
    # every sampled token is among the top 5 of its step
    top5 = model(s1[:, :-1])[:, 4:].topk(5, dim=-1).indices
    assert (top5 == s1[:, 5:, None]).any(-1).all()


def test_generate_stops_at_eos():
    torch.manual_seed(0)
    model = build_model(gpt_cfg())
    prompt = torch.randint(0, 101, (1, 3))
    first = int(model.generate(prompt, 1)[0, -1])
    out = model.generate(prompt, 10, eos_id=first)
    assert out.shape == (1, 4)


@pytest.mark.parametrize("experts", [0, 4])
def test_under_autocast_the_projections_share_one_cast_of_the_normed_input(experts):
    """bf16 autocast: q, k and v (and a dense MLP's gate and up) read the same bf16 tensor, cast once from the
    norm's output, not three (two) casts of it; an MoE layer gets the norm's output itself (its router computes in
    fp32, its experts cast). In fp32 every projection reads the norm's output itself."""
    extra = [f"model.n_experts={experts}", "model.moe_top_k=2", "model.moe_ffn_hidden=32"] if experts else []
    cfg = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64",
                             "model.seq_len=8", *extra])
    model = build_model(cfg.model)
    block = model.layers["0"]
    seen = {}

    def record(name):
        return lambda module, args: seen.__setitem__(name, args[0])

    names = {"q": block.self_attn.q_proj, "k": block.self_attn.k_proj, "v": block.self_attn.v_proj,
             "attn_norm": block.input_layernorm, "mlp_norm": block.post_attention_layernorm, "mlp": block.mlp}
    if not experts:
        names.update(gate=block.mlp.gate_proj, up=block.mlp.up_proj)
    for name, module in names.items():
        module.register_forward_pre_hook(record(name))
    outputs = {}
    for name in ("attn_norm", "mlp_norm"):
        names[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    tokens = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens)
    assert seen["q"] is seen["k"] is seen["v"] and seen["q"].dtype == torch.bfloat16
    if experts:
        assert seen["mlp"] is outputs["mlp_norm"]  # no cast for the router: it reads the norm's output in fp32
    else:
        assert seen["gate"] is seen["up"] and seen["gate"].dtype == torch.bfloat16
    model(tokens)
    assert seen["q"] is outputs["attn_norm"] and seen["q"].dtype == torch.float32
    assert seen["mlp"] is outputs["mlp_norm"]


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_the_residual_stream_is_bf16_under_autocast_unless_fp32_residual(fp32_residual):
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64",
                             "model.seq_len=8", f"model.fp32_residual={str(fp32_residual).lower()}"])
    model = build_model(cfg.model)
    seen = []
    for block in model.layers.values():
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(torch.randint(0, 64, (2, 8)))
    want = torch.float32 if fp32_residual else torch.bfloat16
    assert seen == [want, want] and hidden.dtype == want
    seen.clear()
    assert model.hidden_states(torch.randint(0, 64, (2, 8))).dtype == torch.float32 and seen == [torch.float32] * 2


@pytest.mark.parametrize("arch, flavor, norm", [("gpt", "llama", "rms_norm"), ("gpt", "gpt2", "layer_norm"),
                                                ("bert", "llama", "layer_norm")])
def test_the_residual_add_fused_into_the_triton_norm_trains_like_add_then_norm(arch, flavor, norm):
    """model.kernels with the Triton norm: each residual add and the norm after it are one kernel (GPT: the
    attention's add with post_attention_layernorm, the MLP's with the next block's input_layernorm or the final
    norm; BERT's post-LN: both adds). fp32 logits and every gradient equal the same model with the adds and the
    norms apart, within 1e-6 — also with every block's activations recomputed (full activation checkpointing)."""
    pytest.importorskip("triton")
    from ..conftest import TINY_MODEL

    cfg = load_config(None, [f"model.arch={arch}", f"model.flavor={flavor}", *TINY_MODEL, f"model.kernels={norm}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    blocks = list(model.layers.values())

    def run(fused):
        for block in blocks:
            block.fused_add_norm = fused
        model.zero_grad()
        logits = model(tokens)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                                 for n, p in model.named_parameters()}

    assert all(block.fused_add_norm for block in blocks)  # on by default with the Triton norm
    fused, unfused = run(True), run(False)
    from pretrain.parallel.checkpointing import apply_activation_checkpointing

    apply_activation_checkpointing(model, "full", 1)
    blocks = list(model.layers.values())
    recomputed = run(True)
    for got in (fused, recomputed):
        torch.testing.assert_close(got[0], unfused[0], atol=1e-6, rtol=1e-6)
        for name, grad in unfused[1].items():
            torch.testing.assert_close(got[1][name], grad, atol=1e-6, rtol=1e-6, msg=name)


def test_the_torch_rms_norm_takes_its_weight_in_the_inputs_dtype():
    """Under bf16 autocast the residual stream is bf16 and the norm weight fp32: torch's rms_norm gets the weight
    in bf16 (with mismatched dtypes it never reaches its fused CUDA kernel); fp32 stays fp32 and bit for bit."""
    import warnings

    from pretrain.models.ops import torch_rms_norm

    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    assert torch.equal(torch_rms_norm(x, w, 1e-6), torch.nn.functional.rms_norm(x, (64,), w, 1e-6))
    xb = x.bfloat16().requires_grad_()
    wr = w.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns "Mismatch dtype between input and weight" otherwise
        y = torch_rms_norm(xb, wr, 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch.nn.functional.rms_norm(x, (64,), w, 1e-6), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert wr.grad.dtype == torch.float32 and torch.isfinite(wr.grad).all()
