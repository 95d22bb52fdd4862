"""Layouts of one model on one cluster, ranked: every combination of TP, PP (schedule, virtual stages), CP, EP,
ZeRO stage, activation checkpointing and micro-batch that the trainer accepts (``ParallelDims`` and the config's
own checks decide) and that fits the GPU (``memory.py``), by predicted tokens/s (``speed.py``)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from pretrain.config import Config, ConfigError
from pretrain.parallel.dims import ParallelDims, stages_per_rank
from pretrain.plan.hardware import GPU
from pretrain.plan.memory import Memory, estimate_memory
from pretrain.plan.speed import FITTED, Constants, Estimate, Layout, Shape, estimate

GIB = 2**30


def shape_of(cfg: Config) -> Shape:
    m = cfg.model
    gated = m.arch == "gpt" and m.flavor == "llama"
    from pretrain.models.flops import attention_matmul_params

    return Shape(m.n_layers, m.d_model, m.n_heads, m.kv_heads, m.ffn_dim, m.vocab_size, gated,
                 m.n_experts, m.moe_top_k, m.expert_dim if m.n_experts else 0, m.n_shared_experts,
                 m.moe_dense_layers if m.n_experts else 0, head_dim_=m.head_size,
                 attention_params_=attention_matmul_params(m) if m.mla else 0,
                 score_dim_=(m.qk_head_dim + m.value_head_dim) / 2 if m.mla else 0, mtp=m.mtp_depth)


def layout_of(cfg: Config, dims: ParallelDims) -> Layout:
    p = cfg.parallel
    return Layout(dims.world_size, dims.tp, dims.pp, stages_per_rank(cfg) if dims.pp > 1 else 1, dims.cp, dims.ep,
                  p.zero_stage, p.activation_checkpointing, cfg.train.micro_batch_size,
                  "fp8" if cfg.train.fp8 != "none" else "bf16")


@dataclass
class Option:
    overrides: list[str]
    dims: ParallelDims
    memory: Memory
    speed: Estimate


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``overrides`` applied, validated; ``cfg`` untouched (the sections they name are copied)."""
    from pretrain.config import apply_override

    out = copy.copy(cfg)
    for section in {item.split(".", 1)[0] for item in overrides}:
        if hasattr(out, section):
            setattr(out, section, copy.deepcopy(getattr(cfg, section)))
    for item in overrides:
        apply_override(out, item)
    return out.validate()


def evaluate(cfg: Config, world: int, gpu: GPU, global_batch: int,
             constants: Constants = FITTED) -> tuple[ParallelDims, Memory, Estimate]:
    dims = ParallelDims.from_config(cfg, world)
    memory = estimate_memory(cfg, world)
    speed = estimate(shape_of(cfg), layout_of(cfg, dims), gpu, cfg.model.seq_len, global_batch, constants,
                     density=planned_density(cfg))
    return dims, memory, speed


def planned_density(cfg: Config) -> float:
    """The attention density the step-time model assumes: ``plan.mean_doc_len`` (or synthetic data's document
    length) with ``data.document_mask``, else 1."""
    from pretrain.plan.speed import attention_density

    if not cfg.data.document_mask:
        return 1.0
    m, d = cfg.model, cfg.data
    doc_len = cfg.plan.mean_doc_len or (d.synthetic_doc_len or m.seq_len // 4 if d.source == "synthetic" else 0)
    return attention_density(m.seq_len, doc_len, causal=m.arch == "gpt")


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def candidates(cfg: Config, world: int, gpus_per_node: int) -> list[list[str]]:
    """Override sets to try: TP inside a node, PP over the layers, CP for long sequences, EP for MoE."""
    m = cfg.model
    out = []
    tps = [t for t in _divisors(world, gpus_per_node) if t & (t - 1) == 0]
    pps = [p for p in _divisors(world, m.n_layers) if p in (1, 2, 4, 8, 16, 32)]
    cps = [c for c in (1, 2, 4, 8) if world % c == 0 and m.seq_len // c >= 4096] or [1]
    eps = [e for e in (1, 2, 4, 8, 16, 32, 64) if m.n_experts and m.n_experts % e == 0] or [1]
    for tp, pp, cp, ep in itertools.product(tps, pps, cps, eps):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        if ep > 1 and (dp * cp) % ep:
            continue
        schedules = ["1f1b", "interleaved_1f1b"] if pp > 1 else ["1f1b"]
        for schedule, zero, ac in itertools.product(schedules, (1, 2, 3), ("none", "selective", "full")):
            out.append([f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}", f"parallel.ep={ep}",
                        "parallel.dp_shard=-1", "parallel.dp_replicate=1", f"parallel.pp_schedule={schedule}",
                        f"parallel.zero_stage={zero}", f"parallel.activation_checkpointing={ac}",
                        f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}"])
    return out


def search(cfg: Config, world: int, gpu: GPU, global_batch_tokens: int, top: int = 10,
           constants: Constants = FITTED) -> tuple[list[Option], int]:
    """The ``top`` fitting layouts by predicted tokens/s, and how many were tried. The global batch (in
    sequences) stays fixed; each layout takes the largest micro-batch that divides its share and fits.
    ``constants``: the speed model's (``--meter`` puts the step-cost meter's bytes into ``memory_bytes``)."""
    seq = cfg.model.seq_len
    global_batch = max(1, global_batch_tokens // seq)
    budget = gpu.hbm_gib * GIB * cfg.plan.usable_fraction
    found, tried = [], 0
    for base in candidates(cfg, world, gpu.gpus_per_node):
        best = None
        for micro in (1, 2, 4, 8, 16):
            overrides = [*base, f"train.micro_batch_size={micro}"]
            try:
                trial = with_overrides(cfg, overrides)
                dims = ParallelDims.from_config(trial, world)
            except ConfigError:
                continue
            if global_batch % (dims.dp * micro):
                continue
            accum = global_batch // (dims.dp * micro)
            if dims.pp > 1 and (micro % (trial.parallel.n_microbatches or dims.pp)):
                continue
            tried += 1
            try:
                dims, memory, speed = evaluate(with_overrides(trial, [f"train.grad_accum={accum}"]), world, gpu,
                                               global_batch, constants)
            except ConfigError:
                continue
            if memory.total_bytes > budget:
                continue
            if best is None or (round(speed.tokens_per_s), -memory.total_bytes) > (
                    round(best.speed.tokens_per_s), -best.memory.total_bytes):
                best = Option([*overrides, f"train.grad_accum={accum}"], dims, memory, speed)
        if best is not None:
            found.append(best)
    found.sort(key=lambda o: (-round(o.speed.tokens_per_s), o.memory.total_bytes))  # ties: the smaller footprint
    return found[:top], tried


def describe(option: Option) -> str:
    d = option.dims
    v = dict(o.split("=", 1) for o in option.overrides)
    schedule = {"1f1b": "", "interleaved_1f1b": "i"}.get(v.get("parallel.pp_schedule", ""), "")
    return (f"tp{d.tp} pp{d.pp}{schedule} cp{d.cp} ep{d.ep} dp{d.dp} zero{v.get('parallel.zero_stage')} "
            f"ac={v.get('parallel.activation_checkpointing')} mb{v.get('train.micro_batch_size')}"
            f"×{v.get('train.grad_accum')}")


def minimal_overrides(option: Option, cfg: Config) -> list[str]:
    """The option's overrides that differ from ``cfg``."""
    out = []
    for item in option.overrides:
        key, value = item.split("=", 1)
        if key == "parallel.sequence_parallel" and option.dims.tp == 1:
            continue  # no effect without TP
        section, name = key.split(".")
        current = getattr(getattr(cfg, section), name)
        if str(current).lower() != value.lower():
            out.append(item)
    return out
