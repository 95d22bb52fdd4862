"""Run under torchrun: train several parallel layouts for a few steps, each against a single-process reference
that every rank computes itself, and print one line per layout: ``LAYOUT name loss_diff param_diff``.

    python -m torch.distributed.run --standalone --nproc-per-node=4 tests/parallel/harness.py NAME [NAME ...]

Exit status 1 if any layout differs by more than the tolerance. One launch serves many layouts: starting
ranks costs more than training a tiny model.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config import load_config  # noqa: E402
from pretrain.distributed import DistInfo, init_distributed  # noqa: E402
from pretrain.parallel.dims import ParallelDims  # noqa: E402
from pretrain.tasks import GPTTask, _cross_entropy  # noqa: E402
from pretrain.train import build_trainer  # noqa: E402

TOLERANCE = 1e-5
GLOBAL_BATCH = 8  # samples per optimizer step, whatever the layout
STEPS = 3

BASE = ["model.n_layers=4", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "model.seq_len=16",
        f"train.steps={STEPS}", "schedule.warmup_steps=1", "schedule.decay=constant", "optim.lr=1e-3",
        "logging.interval=0", "logging.tensorboard=false", "eval.interval=0", "checkpoint.interval=0",
        "checkpoint.resume=never", "data.source=synthetic", "parallel.meta_init=false", "model.tie_embeddings=false",
        "optim.grad_clip=0.05"]  # clipping active in every step: the norm must count every shard once

MUON = ["optim.name=muon", "optim.muon_ns_dtype=fp32"]  # fp32 Newton–Schulz: see the muon_* layouts
FP8 = ["train.fp8=tensorwise"]  # emulated on CPU: the same casts and scales as the FP8 GEMMs
FUSED_ADAMW = ["optim.impl=triton"]  # kernels/adamw.py on each rank's shards; the reference is torch's AdamW
MOE = ["model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32", "model.n_shared_experts=1",
       "model.moe_balance=both", "model.moe_bias_rate=0.01", "model.moe_router=sigmoid", "model.moe_aux_coef=0.1",
       "model.moe_z_coef=0.01"]
QWEN3 = ["model.head_dim=16", "model.qk_norm=true", "model.n_kv_heads=2"]
# DeepSeek-V3's parts: MLA (query bottleneck, qk 12 ≠ v 8), group-limited routing with routed scaling, two MTP depths
MLA = ["model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=12", "model.qk_nope_head_dim=8",
       "model.qk_rope_head_dim=4", "model.v_head_dim=8"]
MLA_YARN = ['model.rope_scaling={rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 8, mscale = 1.0, '
            "mscale_all_dim = 1.0}"]
DEEPSEEK = [*MLA, "model.mtp_depth=2", "model.mtp_loss_coef=0.3", "model.moe_n_group=2", "model.moe_topk_group=1",
            "model.moe_routed_scaling=2.5"]
MTP_EXTRAS = ("mtp_loss", "mtp_loss_1", "mtp_loss_2")
LLAMA32 = ["model.n_kv_heads=2", "model.tie_embeddings=true", "model.rope_theta=500000.0",
           'model.rope_scaling={rope_type = "llama3", factor = 32.0, low_freq_factor = 1.0, high_freq_factor = 4.0, '
           "original_max_position_embeddings = 8}"]
QWEN2 = ["model.qkv_bias=true", "model.n_kv_heads=2",
         'model.rope_scaling={rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 8}']

# packed documents (data.document_mask): synthetic rows cut into documents of mean length 5, positions restarting
DOCS = ["data.document_mask=true", "data.reset_positions=true", "data.mask_document_boundary=true",
        "data.synthetic_doc_len=5"]

# name -> (world size, overrides); micro_batch × grad_accum × dp = GLOBAL_BATCH in every one
LAYOUTS = {
    "dp2": (2, ["train.micro_batch_size=4"]),
    "dp2_accum": (2, ["train.micro_batch_size=2", "train.grad_accum=2"]),
    "zero1_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=1"]),
    "zero2_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=2"]),
    "zero3_2": (2, ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=3"]),
    "zero3_offload_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3", "parallel.cpu_offload=true"]),
    "tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp2_sp": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2_sp_gpt2": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=true",
                        "model.flavor=gpt2"]),  # learned positions beside the sequence-sharded embedding
    "tp2_gpt2_tied": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=false",
                          "model.flavor=gpt2", "model.tie_embeddings=true"]),
    "bert_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=false",
                     "model.arch=bert"]),
    "ac_full_dp2": (2, ["train.micro_batch_size=4", "parallel.activation_checkpointing=full"]),
    "pp2_gpipe": (2, ["train.micro_batch_size=8", "parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2_1f1b": (2, ["train.micro_batch_size=4", "train.grad_accum=2", "parallel.pp=2", "parallel.pp_schedule=1f1b",
                     "parallel.n_microbatches=4"]),
    "pp2_interleaved": (2, ["train.micro_batch_size=8", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"]),
    "pp2_zbv": (2, ["train.micro_batch_size=8", "parallel.pp=2", "parallel.pp_schedule=zbv"]),
    "ds_zero1_2": (2, ["train.micro_batch_size=4", "parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    "ds_zero2_2": (2, ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.engine=deepspeed",
                       "parallel.zero_stage=2"]),
    "ds_zero3_2": (2, ["train.micro_batch_size=4", "parallel.engine=deepspeed", "parallel.zero_stage=3"]),
    "bert_pp2": (2, ["train.micro_batch_size=8", "parallel.pp=2", "model.arch=bert"]),
    "gpt2_tied_pp2_zbv": (2, ["train.micro_batch_size=8", "parallel.pp=2", "parallel.pp_schedule=zbv",
                              "model.flavor=gpt2", "model.tie_embeddings=true"]),
    "bert_pp2_meta": (2, ["train.micro_batch_size=8", "parallel.pp=2", "model.arch=bert", "parallel.meta_init=true"]),
    "zero3_4": (4, ["train.micro_batch_size=2", "parallel.zero_stage=3"]),
    "hsdp_2x2": (4, ["train.micro_batch_size=2", "parallel.zero_stage=3", "parallel.dp_replicate=2"]),
    "tp2_dp2": (4, ["train.micro_batch_size=4", "parallel.tp=2", "parallel.zero_stage=2"]),
    "tp2_sp_dp2_zero3": (4, ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.tp=2",
                             "parallel.zero_stage=3", "parallel.activation_checkpointing=selective"]),
    "pp2_dp2": (4, ["train.micro_batch_size=4", "parallel.pp=2", "parallel.zero_stage=2"]),
    "pp2_dp2_zero3": (4, ["train.micro_batch_size=4", "parallel.pp=2", "parallel.zero_stage=3"]),
    "bert_tp2_pp2": (4, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.pp=2", "model.arch=bert",
                         "parallel.sequence_parallel=false"]),
    "gpt2_tied_pp2_dp2": (4, ["train.micro_batch_size=4", "parallel.pp=2", "parallel.zero_stage=3",
                              "model.flavor=gpt2", "model.tie_embeddings=true"]),
    "tp2_dp2_meta": (4, ["train.micro_batch_size=4", "parallel.tp=2", "parallel.zero_stage=3",
                         "parallel.meta_init=true"]),
    "tp2_pp2": (4, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.pp=2"]),
    "tp2_pp2_dp2": (8, ["train.micro_batch_size=4", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=3",
                        "parallel.pp_schedule=interleaved_1f1b"]),
    "bert_tp2_dp2": (4, ["train.micro_batch_size=4", "parallel.tp=2", "parallel.sequence_parallel=false",
                         "parallel.zero_stage=3", "model.arch=bert"]),
    # a task with an extra loss term and a metric (AuxTask) under each step engine: local (the one-process
    # reference, and DDP), pipeline, DeepSpeed; the terms must reach metrics.jsonl equal to the reference's
    "aux_dp2": (2, ["train.micro_batch_size=4", "task=aux"]),
    "aux_pp2": (2, ["train.micro_batch_size=4", "train.grad_accum=2", "parallel.pp=2", "task=aux"]),
    "aux_ds_zero1": (2, ["train.micro_batch_size=4", "parallel.engine=deepspeed", "parallel.zero_stage=1",
                         "task=aux"]),
    # MoE layers: the sequence-wise aux loss and the z-loss (entering the backward inside each layer, on whatever
    # stage), the aux-loss-free bias (loads summed over dp and pp) must all match one process exactly
    "moe_dp2": (2, ["train.micro_batch_size=4", *MOE]),
    "moe_zero3_2": (2, ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=3", *MOE]),
    "moe_ep2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2", *MOE]),
    # DeepSeek-V3-class (MLA + MTP + group-routed MoE): the MTP terms reach metrics.jsonl equal to one process's
    "deepseek_dp2": (2, ["train.micro_batch_size=4", *MOE, *DEEPSEEK]),
    "deepseek_zero3_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3", *MOE, *DEEPSEEK]),
    "deepseek_ep2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2", *MOE, *DEEPSEEK]),
    # MLA's heads split over tp (q_b_proj, kv_b_proj column-, o_proj row-parallel; the down-projections whole)
    "mla_tp2_sp": (2, ["train.micro_batch_size=8", "parallel.tp=2", *MOE, *MLA]),
    "mla_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=false", *MLA]),
    "deepseek_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=false", *MOE,
                         *DEEPSEEK]),
    "deepseek_tp2_sp": (2, ["train.micro_batch_size=8", "parallel.tp=2", *MOE, *DEEPSEEK, *DOCS]),
    # MLA across cp ranks (qk head dim 12 ≠ v 8 through the ring's blocks and the all-to-all), with YaRN's mscale
    # with MTP: its shifts cross the chunks (the whole targets and document ids), each depth's block context-parallel
    # (MoE's sequence-wise aux loss cannot run under CP: the bias alone balances)
    "deepseek_cp2_ring": (2, ["train.micro_batch_size=8", "parallel.cp=2", *MOE, "model.moe_balance=bias", *DEEPSEEK,
                              *MLA_YARN]),
    "deepseek_cp2_alltoall": (2, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.cp_impl=alltoall", *MOE,
                                  "model.moe_balance=bias", *DEEPSEEK, *DOCS]),
    # PP: MTP on the last stage with the head and a copy of the embedding (gradients summed with the first's), the
    # targets and the documents travelling along the stages
    "deepseek_pp2": (2, ["train.micro_batch_size=4", "train.grad_accum=2", "parallel.pp=2", "parallel.n_microbatches=2",
                         *MOE, *DEEPSEEK, *DOCS]),
    # MLA through the Triton attention across cp ranks (interpreted: slow): the ring's Triton blocks, the all-to-all
    "mla_cp2_ring_triton": (2, ["train.micro_batch_size=8", "parallel.cp=2", *MLA, "model.kernels=attention"]),
    "mla_cp2_alltoall_triton": (2, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.cp_impl=alltoall", *MLA,
                                    *DOCS, "model.kernels=attention"]),
    "deepseek_ep2_pp2": (4, ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.pp=2",
                             "parallel.n_microbatches=2", "parallel.zero_stage=2", "parallel.ep=2", *MOE, *DEEPSEEK]),
    "moe_tp2_sp": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=true", *MOE]),
    "moe_pp2": (2, ["train.micro_batch_size=4", "train.grad_accum=2", "parallel.pp=2", "parallel.n_microbatches=2",
                    *MOE]),
    "moe_ep2_dp2": (4, ["train.micro_batch_size=2", "parallel.zero_stage=3", "parallel.ep=2", *MOE]),
    "moe_ep2_tp2": (4, ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2", "parallel.tp=2",
                        "parallel.sequence_parallel=false", *MOE]),
    # Muon: each matrix's update gathered whole, so every layout takes the one-process step (Newton–Schulz in
    # fp32 here: in bf16 the 1e-7 differences of reordered gradient reductions flip roundings, 3e-5 after 3 steps)
    "muon_dp2": (2, ["train.micro_batch_size=4", *MUON]),
    "muon_zero3_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3", *MUON]),
    "muon_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", *MUON]),
    "muon_pp2": (2, ["train.micro_batch_size=8", "parallel.pp=2", *MUON]),
    "muon_moe_ep2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2", *MOE,
                         *MUON]),
    # FP8: every cast's amax taken over the whole tensor (TP's DTensor reductions, FSDP's gathered weight)
    "fp8_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", *FP8]),
    "fp8_zero3_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3", *FP8]),
    "fp8_rowwise_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=false",
                            "train.fp8=rowwise"]),
    "fp8_pp2": (2, ["train.micro_batch_size=8", "parallel.pp=2", "parallel.n_microbatches=2", *FP8]),
    # today's model shapes: Qwen3 (head_dim != d_model / n_heads, QK-norm), Llama 3.2 (llama3 RoPE scaling, GQA,
    # tied head), Qwen2 (q/k/v biases, yarn)
    "qwen3_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", *QWEN3]),
    "qwen3_zero3_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3", *QWEN3]),
    "llama32_tp2": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=false", *LLAMA32]),
    "llama32_zero3_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3", *LLAMA32]),
    "qwen2_tp2_sp": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=true", *QWEN2]),
    "qwen2_cp2": (2, ["train.micro_batch_size=8", "parallel.cp=2", *QWEN2]),
    "llama32_cp2": (2, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.cp_impl=alltoall", *LLAMA32]),
    # document masking under the layouts it composes with (the ids and positions travel with each batch)
    "docs_tp2_sp": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=true", *DOCS,
                        "model.n_kv_heads=2"]),
    "docs_zero3_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3", *DOCS]),
    "docs_moe_ep2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2", *MOE, *DOCS]),
    "cp2_ring": (2, ["train.micro_batch_size=8", "parallel.cp=2"]),
    "cp2_ring_accum": (2, ["train.micro_batch_size=4", "train.grad_accum=2", "parallel.cp=2"]),  # DDP over cp: sync deferred
    "cp2_alltoall": (2, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.cp_impl=alltoall",
                         "parallel.zero_stage=3"]),
    # the Triton norms with the residual adds fused in (models/gpt.py Block): across pipeline stages (each stage
    # sends its whole residual stream), under FSDP with every block recomputed
    # (2 layers: the norms run in the interpreter)
    "pp2_fused_norms": (2, ["train.micro_batch_size=8", "parallel.pp=2", "model.kernels=rms_norm", "model.n_layers=2"]),
    "zero3_ac_fused_norms": (2, ["train.micro_batch_size=4", "parallel.zero_stage=3",
                                 "parallel.activation_checkpointing=full", "model.kernels=rms_norm", "model.n_layers=2"]),
    # one layer: the Triton attention runs in the interpreter here (4 layers took ~100 s of a 3-minute launch)
    "cp2_ring_triton": (2, ["train.micro_batch_size=8", "parallel.cp=2", "model.kernels=attention", "model.n_layers=1",
                        "model.n_heads=2", "model.n_kv_heads=1"]),
    "docs_pp2_1f1b": (2, ["train.micro_batch_size=4", "train.grad_accum=2", "parallel.pp=2",
                          "parallel.n_microbatches=4", *DOCS]),
    "docs_bert_pp2": (2, ["train.micro_batch_size=8", "parallel.pp=2", "model.arch=bert", *DOCS[:2], DOCS[3]]),
    "docs_cp2_ring": (2, ["train.micro_batch_size=8", "parallel.cp=2", *DOCS]),
    "docs_cp2_alltoall": (2, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.cp_impl=alltoall", *DOCS]),
    "moe_cp2": (2, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.zero_stage=2", *MOE,
                    "model.moe_balance=bias"]),
    "cp4_ring": (4, ["train.micro_batch_size=8", "parallel.cp=4", "parallel.zero_stage=2"]),
    # document masking across the cp ranks: ring (torch and Triton blocks) and all-to-all, positions restarting
    "docs_cp4_ring": (4, ["train.micro_batch_size=8", "parallel.cp=4", "parallel.zero_stage=2", *DOCS]),
    "docs_cp2_pp2": (4, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.pp=2", "parallel.zero_stage=2", *DOCS]),
    "docs_cp2_tp2": (4, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.tp=2", "parallel.zero_stage=2",
                         *DOCS]),
    "cp2_tp2": (4, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.tp=2", "parallel.zero_stage=2"]),
    "cp2_alltoall_tp2": (4, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.cp_impl=alltoall",
                             "parallel.tp=2", "parallel.zero_stage=3", "parallel.sequence_parallel=false"]),
    "cp2_dp2": (4, ["train.micro_batch_size=4", "parallel.cp=2", "parallel.zero_stage=3"]),
    "moe_cp2_ep2": (4, ["train.micro_batch_size=4", "parallel.cp=2", "parallel.ep=2", "parallel.zero_stage=3", *MOE,
                        "model.moe_balance=bias"]),
    "moe_cp2_ep4": (4, ["train.micro_batch_size=4", "parallel.cp=2", "parallel.ep=4", "parallel.zero_stage=2",
                        "parallel.dp_shard=2", *MOE, "model.moe_balance=bias"]),
    "cp2_pp2": (4, ["train.micro_batch_size=8", "parallel.cp=2", "parallel.pp=2", "parallel.zero_stage=2"]),
    "muon_tp2_dp2": (4, ["train.micro_batch_size=4", "parallel.tp=2", "parallel.zero_stage=3", *MUON]),
    "moe_ep2_pp2": (4, ["train.micro_batch_size=4", "parallel.zero_stage=3", "parallel.ep=2", "parallel.pp=2",
                        *MOE]),
    # the Triton AdamW (interpreted, fp32) updating DTensor shards: FSDP2, TP, EP and their mixes equal one process
    # running torch.optim.AdamW within FUSED_TOLERANCE
    "adamw_triton_zero2_2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=2", *FUSED_ADAMW]),
    "adamw_triton_zero3_2": (2, ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=3",
                                 *FUSED_ADAMW]),
    "adamw_triton_tp2_sp": (2, ["train.micro_batch_size=8", "parallel.tp=2", "parallel.sequence_parallel=true",
                                *FUSED_ADAMW]),
    "adamw_triton_moe_ep2": (2, ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2", *MOE,
                                 *FUSED_ADAMW]),
    "adamw_triton_hsdp_2x2": (4, ["train.micro_batch_size=2", "parallel.zero_stage=3", "parallel.dp_replicate=2",
                                  *FUSED_ADAMW]),
    "adamw_triton_tp2_dp2": (4, ["train.micro_batch_size=4", "parallel.tp=2", "parallel.zero_stage=3",
                                 *FUSED_ADAMW]),
    "adamw_triton_moe_ep2_tp2": (4, ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=2",
                                     "parallel.tp=2", "parallel.sequence_parallel=false", *MOE, *FUSED_ADAMW]),
}
FUSED_TOLERANCE = 1e-6


class AuxTask(GPTTask):
    """GPT plus a toy auxiliary loss (a z-loss, 1e-3 · logsumexp² per target: it changes the gradients) and a
    statistic (the mean squared logit per target): what an MoE balancing loss and expert-load metric will be."""

    extra_names = ("aux_zloss", "logit_sq")

    def loss(self, model, batch, accuracy=True):
        return self._with_aux(model(batch["tokens"]), batch["targets"], accuracy)

    def loss_from_output(self, logits, targets, accuracy=True):
        return self._with_aux(logits, targets, accuracy)

    @staticmethod
    def _with_aux(logits, targets, accuracy):
        out = _cross_entropy(logits, targets, accuracy)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        keep = targets.reshape(-1) != -100
        out.extra_losses["aux_zloss"] = 1e-3 * (torch.logsumexp(flat, -1).square() * keep).sum()
        out.metrics["logit_sq"] = (flat.detach().square().mean(-1) * keep).sum()
        return out


def extras_diff(run_dir: str, ref_dir: str, names=None) -> float:
    """Largest difference of the extra terms (``names``, default the aux task's) between two runs' metrics.jsonl
    (inf if either lacks them)."""
    from pretrain.metrics import read_metrics

    runs = [[r for r in read_metrics(Path(d)) if "loss" in r] for d in (run_dir, ref_dir)]
    if len(runs[0]) != STEPS or len(runs[1]) != STEPS:
        return float("inf")
    try:
        return max(abs(a[k] - b[k]) for a, b in zip(*runs) for k in (names or AuxTask.extra_names))
    except KeyError:
        return float("inf")


def full_params(parts: list[torch.nn.Module], gather: bool) -> dict[str, torch.Tensor]:
    """Every parameter, whole: each stage's state gathered over its shards, then merged over all ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    merged = {}
    for part in parts:
        state = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        merged.update({k: v.detach().float().cpu() for k, v in state.items()})
    if gather:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, merged)
        for other in everyone:
            merged.update(other)
    return merged


# Muon layouts whose matrices are sharded: one owner rank per matrix runs its Newton–Schulz (round-robin)
MUON_OWNED = {"muon_zero3_2", "muon_tp2", "muon_moe_ep2", "muon_tp2_dp2"}

# FP8 under TP: the row-parallel sums reorder last bits, and a value on an e4m3/e5m2 rounding boundary then casts
# one step (6-25 %) apart; after a few Adam steps that shows as parameters up to 1.2e-3 apart (Adam turns a small
# gradient's difference into a whole update). These layouts are held to their losses (1e-5) and to their first
# step's gradients: |g - g_ref| / |g_ref| <= 1e-4 for every parameter (measured 6.7e-6 tensorwise, 4e-7 rowwise;
# a wrong scale, one TP shard's amax instead of the whole tensor's, gives 0.13).
FIRST_GRADS = {"fp8_tp2", "fp8_rowwise_tp2"}
FIRST_GRADS_TOLERANCE = 1e-4

# a dynamic FP8 scale is the amax of what one forward sees: these references split the global batch the same way
REFERENCE_SPLIT = {"fp8_zero3_2": 2, "fp8_pp2": 2}

# layouts also checked for save at step 2 -> resume in a fresh trainer -> step 3 equal to the straight run. Each
# kind of restore once: RESHARD's runs already restore into EP2 (from moe_zero3_2) and TP (from pp2_interleaved
# and pp2_dp2_zero3), bert_pp2 and pp2_dp2_zero3 into PP; moe_ep2, tp2_sp and pp2_interleaved save under RESHARD
# layouts the default suite leaves to CI (``slow``): the Triton kernels of each run in the interpreter (4-9 s each on
# 2 cores), their CPU cousins stay in the default launches; tests/parallel/test_parallel.py launches them apart
SLOW_LAYOUTS = {"cp2_ring_triton", "mla_cp2_ring_triton", "mla_cp2_alltoall_triton", "zero3_ac_fused_norms", "pp2_fused_norms",
                "mla_tp2",  # MLA under TP without SP: deepseek_tp2 runs it too (with MTP and MoE)
                "adamw_triton_zero3_2", "deepseek_ep2_pp2",
                "adamw_triton_moe_ep2_tp2", "adamw_triton_tp2_dp2", "adamw_triton_hsdp_2x2"}

RESUME = {"docs_cp2_ring", "fp8_zero3_2", "adamw_triton_zero3_2", "muon_zero3_2", "cp2_ring", "bert_pp2", "zero1_2", "ds_zero2_2",
          "tp2_sp_dp2_zero3", "pp2_dp2_zero3", "hsdp_2x2"}


def first_grads(trainer) -> dict:
    """Record each parameter's whole gradient of the first step (just before the engine clears it)."""
    grads, clear = {}, trainer.engine.zero_grad

    def recorded():
        if not grads:
            for name, p in trainer.parallel.module.named_parameters():
                if p.grad is not None:
                    grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        clear()

    trainer.engine.zero_grad = recorded
    return grads


def run(overrides: list[str], dist_info: DistInfo, run_dir: str, stop_after: int | None = None,
        grads: bool = False):
    aux = "task=aux" in overrides
    logged = aux or any(o.startswith("model.mtp_depth") for o in overrides)  # extra terms: every step's metrics
    overrides = [o for o in overrides if o != "task=aux"] + (["logging.interval=1"] if logged else [])
    cfg = load_config(None, [*BASE, *overrides, f"logging.run_dir={run_dir}"])
    dims = ParallelDims.from_config(cfg, dist_info.world_size)
    trainer = build_trainer(cfg, dist_info, dims)
    if aux:
        trainer.task = AuxTask()
    norms, train_step = [], trainer.train_step

    def recorded_step():
        result = train_step()
        norms.append(result.grad_norm)
        return result

    trainer.train_step = recorded_step
    first = first_grads(trainer) if grads else None
    losses = trainer.fit(stop_after)
    if trainer.moe_layers and dist_info.world_size > 1:  # the aux-loss-free bias: the same on every rank
        mine = {m.index: m.gate.e_score_correction_bias.detach().cpu() for m in trainer.moe_layers}
        everyone = [None] * dist_info.world_size
        dist.all_gather_object(everyone, mine)
        spread = max(((b - other[i]).abs().max().item() for other in everyone for i, b in mine.items()
                      if i in other), default=0.0)
        assert spread == 0.0, f"router biases differ between ranks by {spread}"
    params = full_params(trainer.parallel.parts or [trainer.raw_model], dist_info.world_size > 1)
    params["grad_norms"] = torch.tensor(norms)  # compared like a parameter: the clipping norm counts shards once
    if grads:
        params["first_grads"] = first
    params["ns_calls"] = getattr(trainer.optimizer, "ns_calls", 0)
    return losses, params


# layout -> the layout that resumes its step-2 checkpoint (same world size, other TP / PP / ZeRO split)
RESHARD = {
    "muon_tp2": ["train.micro_batch_size=4", "parallel.zero_stage=3", *MUON],  # TP2 -> ZeRO-3 dp2
    "cp2_alltoall": ["train.micro_batch_size=4", "parallel.zero_stage=3"],  # CP2 -> CP1 (dp 2)
    "moe_ep2": ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=1", *MOE],  # EP2 -> EP1
    "deepseek_ep2": ["train.micro_batch_size=4", "parallel.zero_stage=2", "parallel.ep=1", *MOE, *DEEPSEEK],
    "mla_tp2_sp": ["train.micro_batch_size=4", "parallel.zero_stage=3", *MOE, *MLA],  # MLA: TP2 + SP -> ZeRO-3 dp2
    # MTP on the last stage, its embedding copy: PP2 -> ZeRO-2 dp2
    "deepseek_pp2": ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=2", *MOE, *DEEPSEEK, *DOCS],
    "moe_zero3_2": ["train.micro_batch_size=4", "parallel.zero_stage=3", "parallel.ep=2", *MOE],  # EP1 -> EP2
    "tp2_sp": ["train.micro_batch_size=4", "parallel.zero_stage=2"],
    "pp2_interleaved": ["train.micro_batch_size=8", "parallel.tp=2"],
    "tp2_pp2": ["train.micro_batch_size=2", "parallel.zero_stage=3"],
    "pp2_dp2_zero3": ["train.micro_batch_size=4", "parallel.tp=2", "parallel.zero_stage=2"],
}


# layouts whose step-2 checkpoint (RESUME, RESHARD) is written in the background (checkpoint.async_save): DDP,
# ZeRO-1, FSDP, HSDP, TP, PP and their mixes — the background writes' collectives on their own group while the
# next steps' run on the default one
ASYNC_SAVE = {"cp2_ring", "zero1_2", "muon_zero3_2", "bert_pp2", "tp2_sp", "hsdp_2x2", "tp2_sp_dp2_zero3",
              "pp2_dp2_zero3"}


def resumed_losses(overrides: list[str], dist_info: DistInfo, run_dir: str,
                   resume_overrides: list[str] | None = None, async_save: bool = False) -> tuple[list[float], bool]:
    """(the losses of a run stopped after step 2 and resumed from its step-2 checkpoint, whether that checkpoint
    was complete — written, manifest and all — when the first run ended)."""
    from pretrain.checkpoint.manager import is_complete

    checkpointing = ["checkpoint.interval=2", "checkpoint.resume=auto"]
    run([*overrides, *checkpointing, *(["checkpoint.async_save=true"] if async_save else [])], dist_info, run_dir,
        stop_after=2)
    saved = is_complete(Path(run_dir) / "checkpoints" / "step-00000002")
    return run([*(resume_overrides or overrides), *checkpointing], dist_info, run_dir)[0], saved


def consolidated_matches(run_dir: str, reference: dict[str, torch.Tensor]) -> float:
    """Max difference between the step-2 checkpoint of a parallel run, consolidated on CPU by one process (what
    the HF export reads), and one process's parameters after the same 2 steps."""
    from pretrain.checkpoint import load_model

    ours, _ = load_model(f"{run_dir}/checkpoints/step-00000002")
    return max((ours.state_dict()[k] - v).abs().max().item() for k, v in reference.items() if k not in ("grad_norms", "ns_calls"))


ARCH_PREFIXES = ("model.arch", "model.flavor", "model.tie", "task=", "model.n_experts", "model.moe", "model.n_shared",
                 "model.kernels", "optim.name", "optim.muon", "train.fp8", "model.head_dim", "model.qk_norm",
                 "model.qkv_bias", "model.rope", "model.n_kv_heads", "model.n_layers", "model.n_heads", "data.document",
                 "data.reset_positions", "data.mask_document", "data.synthetic_doc", "model.attention", "model.q_lora",
                 "model.kv_lora", "model.qk_", "model.v_head", "model.mtp")


def reference_keys(name: str) -> list[tuple]:
    """The one-process runs layout ``name`` is compared with: (overrides, stop_after, first-step gradients)."""
    arch = [o for o in LAYOUTS[name][1] if o.startswith(ARCH_PREFIXES)]
    split = REFERENCE_SPLIT.get(name, 1)
    keys = [((f"train.micro_batch_size={GLOBAL_BATCH // split}", f"train.grad_accum={split}", *arch), None,
             name in FIRST_GRADS)]
    if name in RESHARD:  # its step-2 checkpoint is also consolidated and compared after 2 steps
        keys.append(((f"train.micro_batch_size={GLOBAL_BATCH}", *arch), 2, False))
    return keys


def shared_references(names: list[str], info: DistInfo, tmp: str) -> dict[tuple, tuple]:
    """Every distinct one-process reference of this launch, each computed once, by one rank (round-robin), and
    shared with all: key -> (losses, params, the run directory holding its metrics)."""
    keys = list(dict.fromkeys(k for name in names for k in reference_keys(name)))
    mine = {}
    for i, key in enumerate(keys):
        if i % info.world_size == info.rank:
            overrides, stop_after, grads = key
            run_dir = f"{tmp}/reference-{i}"
            mine[key] = (*run(list(overrides), DistInfo(0, 1, 0, torch.device("cpu")), run_dir, stop_after, grads),
                         run_dir)
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    return {key: value for part in everyone for key, value in part.items()}


# checks that are not training layouts, run inside the launch of their world size (no launch of their own):
# name -> (world sizes, module with ``checks() -> failed``); each prints its own lines
CHECKS = {"cp_attention": ((2, 4), "tests.parallel.cp_attention"), "moe_dispatch": ((2,), "tests.parallel.moe_dispatch"),
          "downstream": ((2,), "tests.parallel.downstream_layouts")}


def main(names: list[str]) -> int:
    import importlib

    info = init_distributed("cpu")
    failed = False
    for name in [n for n in names if n in CHECKS]:
        failed |= importlib.import_module(CHECKS[name][1]).checks()
    names = [n for n in names if n not in CHECKS]

    with tempfile.TemporaryDirectory() as own:
        shared = [own]
        dist.broadcast_object_list(shared, src=0)  # one run directory for all ranks (checkpoints are shared)
        tmp = shared[0]
        started = time.perf_counter()
        references = shared_references(names, info, tmp)
        if info.rank == 0:
            print(f"REFERENCES {len(references)} one-process runs shared by {len(names)} layouts, "
                  f"seconds={time.perf_counter() - started:.1f}", flush=True)
        for name in names:
            started = time.perf_counter()
            world, overrides = LAYOUTS[name]
            assert world == info.world_size, f"{name} needs {world} ranks"
            main_key, *reshard_key = reference_keys(name)
            reference, ref_params, ref_dir = references[main_key]
            reference, ref_params = list(reference), dict(ref_params)
            losses, params = run(overrides, info, f"{tmp}/{name}", grads=name in FIRST_GRADS)
            loss_diff = max(abs(a - b) for a, b in zip(reference, losses))
            assert len(losses) == len(reference) == STEPS
            ref_grads, grads = ref_params.pop("first_grads", None), params.pop("first_grads", None)
            ref_calls, calls = ref_params.pop("ns_calls"), params.pop("ns_calls")
            param_diff = max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)
            worst_key = max(ref_params, key=lambda k: (params[k] - ref_params[k]).abs().max().item())
            norm_diff = (params["grad_norms"] - ref_params["grad_norms"]).abs().max().item()
            assert params.keys() == ref_params.keys()
            tolerance = FUSED_TOLERANCE if name.startswith("adamw_triton") else TOLERANCE
            ok = loss_diff <= tolerance and param_diff <= tolerance
            if name in FIRST_GRADS:
                param_diff = max(((grads[k] - g).norm() / g.norm()).item() for k, g in ref_grads.items())
                worst_key = "first-step gradients, relative"
                ok = (loss_diff <= TOLERANCE and param_diff <= FIRST_GRADS_TOLERANCE and grads.keys() == ref_grads.keys()
                      and len(grads) > 0)
            extra = ""
            if name in MUON_OWNED:  # each rank orthogonalises only the matrices it owns
                everyone = [None] * info.world_size
                dist.all_gather_object(everyone, calls)
                ok &= 0 < max(everyone) < ref_calls
                extra += f" newton_schulz_runs={everyone}/{ref_calls}"
            if ("task=aux" in overrides or name.startswith("deepseek")) and info.rank == 0:  # rank 0 writes metrics
                diff = extras_diff(f"{tmp}/{name}", ref_dir, MTP_EXTRAS if name.startswith("deepseek") else None)
                ok &= diff <= TOLERANCE
                extra += f" extras_diff={diff:.2e}"
            if "parallel.meta_init=true" in overrides:  # shards drawn on their own: same distribution, not values
                ok = all(abs(a - b) < 0.05 for a, b in zip(reference, losses)) and 0 < param_diff < 1.0
            if name in RESHARD:  # saved under this layout, resumed under another
                again, saved = resumed_losses(overrides, info, f"{tmp}/{name}-reshard", RESHARD[name],
                                              name in ASYNC_SAVE)
                reshard_diff = max(abs(a - b) for a, b in zip(losses, again))
                ok &= len(again) == STEPS and reshard_diff <= TOLERANCE and saved
                at_two = references[reshard_key[0]][1]
                if info.rank == 0:
                    consolidated = consolidated_matches(f"{tmp}/{name}-reshard", at_two)
                    ok &= consolidated <= TOLERANCE
                    print(f"RESHARD {name} diff={reshard_diff:.2e} consolidated_vs_one_process={consolidated:.2e}",
                          flush=True)
                ok_all = torch.tensor(float(ok))
                dist.all_reduce(ok_all, op=dist.ReduceOp.MIN)
                ok = bool(ok_all)
            if name in RESUME:
                again, saved = resumed_losses(overrides, info, f"{tmp}/{name}-resume", async_save=name in ASYNC_SAVE)
                resume_diff = max(abs(a - b) for a, b in zip(losses, again))
                ok &= len(again) == STEPS and resume_diff <= TOLERANCE and saved
                if info.rank == 0:
                    print(f"RESUME {name} diff={resume_diff:.2e}{' (saved in the background)' if name in ASYNC_SAVE else ''}",
                          flush=True)
            failed |= not ok
            if info.rank == 0:
                print(f"LAYOUT {name} {'ok' if ok else 'FAILED'} loss_diff={loss_diff:.2e} "
                      f"param_diff={param_diff:.2e} ({worst_key}) grad_norm_diff={norm_diff:.2e}{extra} "
                      f"losses={[round(x, 6) for x in losses]} seconds={time.perf_counter() - started:.1f}", flush=True)
            dist.barrier()
        dist.barrier()  # rank 0's directory goes away last
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
