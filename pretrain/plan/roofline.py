"""The step-cost meter's reading (``step_cost.py`` counts): one rank's step as an H100 / H200 / B200 runs it — a
roofline over the counted work with the constants of ``pretrain.plan.hardware.METER`` — the JSON report and the
table of ``tools/step_cost.py``, and the planner's HBM constant measured for this model."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.plan.hardware import GPU
from pretrain.plan.hardware import gpu as gpu_named
from pretrain.plan.step_cost import Measurement


@dataclass(frozen=True)
class Roofline:
    gpu: str
    step_s: float
    mfu: float
    tokens_per_s: float  # per GPU
    parts: dict  # seconds per step: matmul, attention, memory, launches, optimizer


def roofline(m: Measurement, cfg, gpu: GPU | str, tp: int | None = None, pp: int | None = None,
             cp: int | None = None, dp_shards: int = 1) -> Roofline:
    """One rank's step as ``gpu`` would run it: the config's micro-batch, sequence, accumulation and layout."""
    from pretrain.models.flops import flops_per_token, num_params
    from pretrain.plan.hardware import METER

    g = gpu_named(gpu) if isinstance(gpu, str) else gpu
    p = cfg.parallel
    tp, pp, cp = tp or p.tp, pp or p.pp, cp or p.cp
    seq = cfg.model.seq_len
    micro_tokens = cfg.train.micro_batch_size * seq / cp  # this rank's tokens per micro-batch
    micro_batches = cfg.train.grad_accum * (p.n_microbatches or 1 if pp > 1 else 1)
    tokens = micro_tokens * micro_batches
    layers = cfg.model.n_layers / pp
    split = tp  # TP splits each layer's matmuls, activations and weights
    width = cfg.model.d_model / tp
    matmul_rate = g.gemm_bf16 * 1e12 * width / (width + METER.width_half)
    matmul = (m.matmul_flops_per_token_layer * layers + m.outside_matmul_flops_per_token / pp) * tokens / split
    attention_flops = (m.attention_fwd_flops_per_token_layer + m.attention_bwd_flops_per_token_layer) * layers \
        * tokens / cp / split  # CP: each rank's queries see 1/cp of the keys' work per token on average
    attention = attention_flops / (g.gemm_bf16 * 1e12 * METER.attention_efficiency)
    bandwidth = g.hbm_tb_s * 1e12 * METER.hbm_efficiency
    memory_bytes = ((m.nonmatmul_bytes_per_token_layer * layers + m.outside_bytes_per_token / pp) * tokens
                    + (m.nonmatmul_bytes_per_microbatch_layer * layers + m.outside_bytes_per_microbatch / pp)
                    * micro_batches
                    + m.nonmatmul_bytes_per_step_layer * layers + m.outside_bytes_per_step / pp) / split
    memory = memory_bytes / bandwidth
    launches = ((m.launches_per_layer * layers + m.outside_launches / pp) * micro_batches + m.optimizer_launches
                + m.launches_per_step_layer * layers + m.outside_launches_per_step / pp)
    launch = launches * METER.launch_us * 1e-6
    optimizer = m.optimizer_bytes_per_param * num_params(cfg.model) / (tp * pp * dp_shards) / bandwidth
    step = matmul / matmul_rate + attention + memory + launch + optimizer
    model_flops = flops_per_token(cfg.model) * tokens / (tp * pp)
    return Roofline(g.name, step, model_flops / step / (g.bf16_tflops * 1e12), tokens / step,
                    {"matmul": matmul / matmul_rate, "attention": attention, "memory": memory, "launches": launch,
                     "optimizer": optimizer})


GPUS_READ = ("h100", "h200", "b200")


def report(m: Measurement, cfg, peer: Measurement | None = None) -> dict:
    """The meter's JSON: the keys the README and gpu_check read."""
    p = cfg.parallel
    shards = p.dp_shard if p.zero_stage >= 1 and p.dp_shard > 1 else 1
    lines = {g: roofline(m, cfg, g, dp_shards=shards) for g in GPUS_READ}
    micro_batches = cfg.train.grad_accum
    out = {
        "kernels": m.kernels, "seq_len": m.seq,
        "matmul_flops_per_token_layer": m.matmul_flops_per_token_layer,
        "attention_fwd_flops_per_token_layer": m.attention_fwd_flops_per_token_layer,
        "attention_bwd_flops_per_token_layer": m.attention_bwd_flops_per_token_layer,
        "attn_bwd_over_fwd_flops": m.attn_bwd_over_fwd_flops,
        "nonmatmul_bytes_per_token_layer": m.nonmatmul_bytes_per_token_layer,
        "nonmatmul_bytes_per_microbatch_layer": m.nonmatmul_bytes_per_microbatch_layer,
        "nonmatmul_bytes_per_step_layer": m.nonmatmul_bytes_per_step_layer,
        "launches_per_layer": m.launches_per_layer,
        "host_syncs_per_step": m.syncs_per_microbatch * micro_batches + m.syncs_per_step + m.optimizer_syncs,
        "optimizer_bytes_per_step": m.optimizer_bytes_per_param * _params(cfg),
        "optimizer_bytes_per_param": m.optimizer_bytes_per_param,
        "bytes_by_op": {k: round(v, 1) for k, v in list(m.bytes_by_op.items())[:12]},
        "roofline_mfu": {g: round(r.mfu, 4) for g, r in lines.items()},
        "roofline_step_s": {g: r.step_s for g, r in lines.items()},
        "roofline_parts_s": {g: r.parts for g, r in lines.items()},
    }
    if peer is not None:
        out["peer"] = {k: v for k, v in report(peer, cfg).items() if k != "peer"}
    return out


def _params(cfg) -> int:
    from pretrain.models.flops import num_params

    return num_params(cfg.model)


def memory_bytes_per_element(m: Measurement, cfg) -> float:
    """The planner's ``memory_bytes`` (HBM bytes per activation element per layer) for this model, measured:
    per-token bytes of a layer over its width, plus the per-micro-batch bytes spread over a micro-batch and the
    per-step bytes over a step."""
    micro_tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    per_token = (m.nonmatmul_bytes_per_token_layer + m.nonmatmul_bytes_per_microbatch_layer / micro_tokens
                 + m.nonmatmul_bytes_per_step_layer / (micro_tokens * cfg.train.grad_accum))
    return per_token / cfg.model.d_model


def fmt_table(rep: dict) -> str:
    """The human table: one column for ours, one for the peer where there is one."""
    cols = [("ours", rep)] + ([("peer", rep["peer"])] if "peer" in rep else [])
    rows = [
        ("matmul GFLOP / token / layer", lambda r: f"{r['matmul_flops_per_token_layer'] / 1e9:.3f}"),
        ("attention fwd GFLOP / token / layer", lambda r: f"{r['attention_fwd_flops_per_token_layer'] / 1e9:.3f}"),
        ("attention bwd / fwd FLOPs", lambda r: f"{r['attn_bwd_over_fwd_flops']:.2f}"),
        ("non-matmul MB / token / layer", lambda r: f"{r['nonmatmul_bytes_per_token_layer'] / 1e6:.3f}"),
        ("non-matmul MB / micro-batch / layer", lambda r: f"{r['nonmatmul_bytes_per_microbatch_layer'] / 1e6:.1f}"),
        ("non-matmul MB / step / layer", lambda r: f"{r['nonmatmul_bytes_per_step_layer'] / 1e6:.1f}"),
        ("launches / layer / micro-batch", lambda r: f"{r['launches_per_layer']:.0f}"),
        ("host syncs / step", lambda r: f"{r['host_syncs_per_step']:.0f}"),
        ("optimizer GB / step", lambda r: f"{r['optimizer_bytes_per_step'] / 1e9:.2f}"),
    ] + [(f"roofline MFU {g}", lambda r, g=g: f"{100 * r['roofline_mfu'][g]:.1f} %") for g in GPUS_READ] \
      + [(f"roofline step {g} (s)", lambda r, g=g: f"{r['roofline_step_s'][g]:.3f}") for g in GPUS_READ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}s}  " + "  ".join(f"{name:>10s}" for name, _ in cols)]
    for label, get in rows:
        lines.append(f"{label:{width}s}  " + "  ".join(f"{get(r):>10s}" for _, r in cols))
    top = list(rep["bytes_by_op"].items())[:8]
    if top:
        lines.append("largest non-matmul traffic (bytes / token / layer): "
                     + ", ".join(f"{op.replace('aten::', '')} {v:.0f}" for op, v in top))
    return "\n".join(lines)
