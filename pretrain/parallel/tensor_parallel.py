"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) as DTensor plans keyed by module name.

Per block: q/k/v and gate/up projections column-parallel (each rank holds H/tp heads, F/tp hidden units), o and
down projections row-parallel (their partial sums all-reduced). GPT with an untied head also gets a
vocab-parallel embedding and a column-parallel head whose logits stay sharded over the vocab: the loss is
computed by ``loss_parallel`` without ever gathering (B, T, V).

Sequence parallelism (Korthikanti et al. 2022, GPT with an untied head, llama flavour): between the blocks the
residual stream and the norms are sharded over the sequence; the all-reduce of row-parallel layers becomes a
reduce-scatter and the input of column-parallel layers an all-gather — the same bytes, 1/tp of the activations.

Tied embeddings (gpt2 flavour, BERT's MLM decoder) stay replicated; the blocks are still sharded.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def block_plan(arch: str, gated: bool, sequence_parallel: bool, moe: bool = False, shared: bool = False,
               qk_norm: bool = False, mla: str = "") -> dict:
    """Plan for one GPT block or BERT encoder layer (names relative to the block). An MoE layer runs whole on every
    tp rank (replicated input; its experts are split by expert parallelism instead), only its shared experts
    sharded like a dense MLP; under SP its input is gathered and its output cut back to this rank's sequence.
    QK-norm weights (one per head width, shared by all heads) stay whole on every rank; each rank normalises its
    own heads (q viewed (B, T, H/tp, E): sharded over dim 2), so the weight's gradient is a partial sum the
    DTensor backward all-reduces over tp, as for sequence-parallel norms. ``mla``: the name of an MLA block's
    head-producing query projection (``q_b_proj``, or ``q_proj`` without the bottleneck): it and ``kv_b_proj``
    are column-parallel (each rank its heads), ``o_proj`` row-parallel; the down-projections (``q_a_proj``,
    ``kv_a_proj_with_mqa``) and the latents' norms stay whole on every rank, as Megatron-core keeps them (the shared
    RoPE key's gradient is summed over tp by the module itself, models/mla.py)."""
    residual = Shard(1) if sequence_parallel else Replicate()
    if mla:
        plan = {f"self_attn.{mla}": ColwiseParallel(), "self_attn.kv_b_proj": ColwiseParallel(),
                "self_attn.o_proj": RowwiseParallel(output_layouts=residual)}
    else:
        plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
        }
    if qk_norm:
        plan.update({"self_attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
                     "self_attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True)})
    if moe and shared:
        plan.update({"mlp.shared_experts.gate_proj": ColwiseParallel(), "mlp.shared_experts.up_proj": ColwiseParallel(),
                     "mlp.shared_experts.down_proj": RowwiseParallel(output_layouts=Replicate())})
    elif not moe:
        plan.update({"mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(output_layouts=residual)})
        if gated:
            plan["mlp.gate_proj"] = ColwiseParallel()
    if sequence_parallel:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            # MLA's whole down-projections take the gathered sequence as a plain tensor (their gradients are whole)
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
                                            use_local_output=bool(mla)),
            "mlp": (PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_input=True, output_layouts=(Replicate(),),
                                             desired_output_layouts=(Shard(1),), use_local_output=True) if moe else
                    PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))),
        })
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (GPT or BERT, possibly one pipeline stage of it) over ``tp_mesh`` in place."""
    from pretrain.parallel.dims import vocab_parallel

    cfg = model.cfg
    gpt = cfg.arch == "gpt"
    sequence_parallel = sequence_parallel and vocab_parallel(cfg)
    if vocab_parallel(cfg):
        top = {}
        if model.embed_tokens is not None:
            top["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(),
                                                  output_layouts=Shard(1) if sequence_parallel else Replicate())
        if model.norm is not None and sequence_parallel:
            top["norm"] = SequenceParallel()
        if gpt and model.embed_positions is not None and model.embed_tokens is not None and sequence_parallel:
            # learned positions (gpt2), (B, T, D) replicated: each rank keeps its sequence shard, like the tokens'
            top["embed_positions"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                         use_local_output=True)
        if model.lm_head is not None:
            top["lm_head"] = ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else Replicate(),
                                             output_layouts=Shard(-1), use_local_output=False)
        parallelize_module(model, tp_mesh, top)
    from pretrain.models.moe import MoE

    gated = gpt and cfg.flavor == "llama"
    # the multi-token-prediction blocks too; their input projection and norms stay whole on every rank, like the MLA
    # down-projections — under sequence parallelism applied to this rank's part of the sequence (position-wise, as
    # the sequence-parallel norms: their weights' gradients are partial sums the DTensor backward all-reduces)
    mtp_blocks = [m.block for m in (getattr(model, "mtp", None) or [])]
    if sequence_parallel:
        for module in getattr(model, "mtp", None) or []:
            parallelize_module(module, tp_mesh, {"enorm": SequenceParallel(use_local_output=True),
                                                 "hnorm": SequenceParallel(use_local_output=True),
                                                 "eh_proj": SequenceParallel(use_local_output=True),
                                                 "norm": SequenceParallel()})
    for block in [*model.layers.values(), *mtp_blocks]:
        block.fused_add_norm = False  # the norms' plan acts on their forward (see models/gpt.py Block)
        moe = isinstance(block.mlp, MoE)
        shared = moe and block.mlp.shared_experts is not None
        mla = ("q_b_proj" if cfg.q_lora_rank else "q_proj") if getattr(cfg, "mla", False) else ""
        if mla:
            block.self_attn.tp_group = tp_mesh.get_group()  # the shared RoPE key's gradient: summed over tp
        parallelize_module(block, tp_mesh, block_plan(cfg.arch, gated, sequence_parallel, moe, shared,
                                                      gpt and cfg.qk_norm, mla))
