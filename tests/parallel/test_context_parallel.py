"""Context parallelism: the zigzag split, bad layouts. Ring and all-to-all attention against one process's causal
attention (tests/parallel/cp_attention.py) runs inside the harness launches (tests/parallel/test_parallel.py). Whole training runs under CP are harness layouts
(cp2_ring, cp2_alltoall, cp4_ring, cp2_tp2, cp2_dp2, cp2_pp2, moe_cp2 in tests/parallel/harness.py)."""

from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.parallel.context_parallel import local_positions, split_sequence
from pretrain.parallel.dims import ParallelDims

ROOT = Path(__file__).resolve().parents[2]


def test_zigzag_gives_each_rank_chunks_r_and_2cp_minus_1_minus_r():
    x = torch.arange(16)[None, :]  # T = 16, cp = 4: chunks of 2
    got = [split_sequence(x, 4, r)[0].tolist() for r in range(4)]
    assert got == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    for r in range(4):
        assert local_positions(4, 4, r).tolist() == got[r]  # RoPE positions follow the tokens
    assert sorted(sum(got, [])) == list(range(16))
    # causal work is balanced: every rank's queries see the same number of keys in total
    work = [sum(p + 1 for p in positions) for positions in got]
    assert len(set(work)) == 1


def dims(*overrides, world):
    cfg = load_config(None, ["model.n_heads=4", "model.d_model=64", "model.seq_len=64", *overrides])
    return ParallelDims.from_config(cfg, world)


def test_cp_takes_its_ranks_from_the_world():
    d = dims("parallel.cp=2", "parallel.tp=2", "parallel.zero_stage=3", world=8)
    assert (d.dp, d.cp, d.tp, d.world_size) == (2, 2, 2, 8)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.cp=3"], 6, "model.seq_len (64) must be divisible by 2 × parallel.cp = 6"),
    (["parallel.cp=8", "parallel.cp_impl=alltoall"], 8,
     'parallel.cp_impl = "alltoall" needs parallel.cp (8) to divide the attention heads of a tp rank (4)'),
    (["parallel.cp=2", "model.arch=bert"], 2, "it needs the llama-flavour GPT, not bert/llama"),
    (["parallel.cp=2", "model.flavor=gpt2", "model.tie_embeddings=true"], 2, "llama-flavour GPT, not gpt/gpt2"),
    (["parallel.cp=2", "model.dropout=0.1"], 2, "attention dropout is not implemented under context parallelism"),
    (["parallel.cp=2", "model.n_experts=6", "parallel.ep=3", "parallel.zero_stage=3", "model.moe_balance=bias"], 6,
     "parallel.ep = 3 takes its ranks from dp_shard × cp: with parallel.cp = 2 it must be a multiple of cp"),
    (["parallel.cp=2", "model.n_experts=8", "parallel.ep=8", "parallel.zero_stage=3", "model.moe_balance=bias"], 4,
     "parallel.ep = 8 takes its ranks from dp_shard (2 here): ep / cp = 4 must divide it"),
    (["parallel.cp=2", "model.n_experts=4"], 2, "the aux loss would see only a rank's chunks of each sequence"),
    (["parallel.cp=2"], 3, "world size 3 is not divisible by dp_replicate × tp × pp × cp = 1 × 1 × 1 × 2 = 2"),
    (["parallel.cp=2", "parallel.tp=2"], 8, "tensor parallelism with data parallelism needs FSDP"),
    (["parallel.cp_impl=ulysses"], 1, "parallel.cp_impl = 'ulysses' is not one of ring, alltoall"),
    (["parallel.cp=0"], 1, "parallel.cp must be >= 1"),
])
def test_bad_context_parallel_layouts_are_one_line_before_any_process_group(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        dims(*overrides, world=world)
    assert message in str(info.value) and "\n" not in str(info.value)


class _AllChunksInOneProcess:
    """A context-parallel attention op for one process holding every rank's chunks, in rank order: its tokens sit
    at the permuted global positions ``order``, and attention masks by those true positions."""

    def __init__(self, order: torch.Tensor):
        self.order = order

    def positions(self, t_local, device=None):
        assert t_local == len(self.order)
        return self.order.to(device)

    def __call__(self, q, k, v, document_ids=None):
        visible = self.order[None, :] <= self.order[:, None]  # key position <= query position
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                                                enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("cp", [2, 4])
def test_rope_under_context_parallelism_takes_the_true_positions(cp):
    """Through the whole model, in one process: the tokens of every cp rank's chunks, in zigzag order, with the
    layers' context op masking by true position, give the one-process logits at those positions — only if RoPE
    rotates each token by its true position (scaled RoPE here, so the tables matter)."""
    from pretrain.models import build_model

    cfg = load_config(None, ["model.n_layers=2", "model.seq_len=32", "model.n_kv_heads=2", "model.head_dim=24",
                             'model.rope_scaling={rope_type = "llama3", factor = 8.0, low_freq_factor = 1.0, '
                             "high_freq_factor = 4.0, original_max_position_embeddings = 8}"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    order = torch.cat([local_positions(32 // cp, cp, r) for r in range(cp)])
    with torch.no_grad():
        whole = model(tokens)
        for layer in model.layers.values():
            layer.self_attn.context = _AllChunksInOneProcess(order)
        chunked = model(tokens[:, order])
    torch.testing.assert_close(chunked, whole[:, order], atol=1e-5, rtol=1e-5)
