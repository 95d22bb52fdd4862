"""RoPE scaling (models/rope.py): the inverse frequencies equal transformers' initialisers for every type we
implement, the tables reach the Triton kernel and context-parallel positions unchanged."""

import pytest
import torch

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.rope import inverse_frequencies

CASES = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.1 / 3.2 / 3.3
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen2.5 / Qwen3 long context
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 1.0, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 1.2,
     "truncate": False, "beta_fast": 16.0},
]


@pytest.mark.parametrize("scaling", CASES, ids=lambda c: c["rope_type"])
@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (64, 500000.0), (128, 1000000.0)])
def test_frequencies_equal_transformers(scaling, head_dim, theta):
    transformers = pytest.importorskip("transformers")
    import inspect

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if "truncate" in scaling and "truncate" not in inspect.getsource(ROPE_INIT_FUNCTIONS["yarn"]):
        pytest.skip(f"transformers {transformers.__version__} always truncates yarn's correction range")

    positions = round(scaling["factor"] * scaling.get("original_max_position_embeddings", 64))
    config = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                      rope_theta=theta, rope_scaling=dict(scaling), max_position_embeddings=positions)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours, our_factor = inverse_frequencies(head_dim, theta, scaling)
    assert (theirs - ours).abs().max() <= 1e-7 and abs(their_factor - our_factor) <= 1e-7
    assert not torch.allclose(ours, inverse_frequencies(head_dim, theta)[0])  # scaling changed something


def test_the_model_tables_carry_scaling_and_the_triton_kernel_uses_them():
    rotary = pytest.importorskip("pretrain.kernels.rotary")
    scaling = 'model.rope_scaling={rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 8}'
    cfg = load_config(None, ["model.n_layers=1", "model.head_dim=24", "model.seq_len=32", scaling]).model
    model = build_model(cfg)
    inv, factor = inverse_frequencies(24, cfg.rope_theta, cfg.rope_scaling)
    angles = torch.arange(32.0)[:, None] * inv
    assert factor > 1 and torch.allclose(model.rotary.cos[:, :12], angles.cos() * factor, atol=1e-6)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 32, 24)
    torch_q, _ = model.rotary(q, q)
    triton_q = rotary.rotary(q, model.rotary.cos, model.rotary.sin)
    torch.testing.assert_close(triton_q, torch_q, atol=1e-5, rtol=1e-5)
    positions = torch.tensor([0, 1, 30, 31])  # a context-parallel rank's chunks: their true positions
    chunk_q, _ = model.rotary(q[:, :, positions], q[:, :, positions], positions)
    torch.testing.assert_close(chunk_q, torch_q[:, :, positions])
