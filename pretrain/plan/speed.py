"""Step time of a layout, from first principles plus a few named constants fitted on published runs.

    step = compute + exposed TP / SP + pipeline bubble + exposed DP / FSDP + exposed CP + EP all-to-all

compute      the step's model FLOPs per GPU (``models/flops.py``: 6·N_matmul + 12·L·H·E·T per token) plus what
             activation recomputation repeats (full: the forward again, 1/3; selective: attention's scores),
             at the GPU's large-GEMM throughput (``hardware.py``) × ``bf16_efficiency`` (``fp8_efficiency`` for
             FP8 linear layers) × w / (w + ``width_half``), w the per-GPU matmul width (d_model / tp): small
             matmuls use the tensor cores worse; attention at ``attention_efficiency`` of the bf16 GEMM rate.
TP / SP      per layer and micro-batch, 4 all-reduces forward + backward (SP: all-gather + reduce-scatter, the same
             bytes) of the micro-batch's activations, ring cost 2(t−1)/t · bytes / bandwidth (NVLink inside a
             node), ``tp_exposed`` of it not hidden.
bubble       (pp − 1) / (v · m) of the pipelined work (m micro-batches per step, v virtual stages per rank).
DP / FSDP    gradients reduced once a step (DDP / ZeRO-1: all-reduce, 2(d−1)/d · bytes) and, under FSDP,
             the weights gathered for each of the m micro-batches (ZeRO-2: (m + 1)(d−1)/d, ZeRO-3: forward and
             backward, (2m + 1)(d−1)/d), over the data-parallel group's slowest link (the network once it spans
             nodes), hidden behind ``dp_overlap`` of the compute.
CP           the ring's K/V exchange per layer, hidden behind the attention it overlaps.
EP           4 all-to-alls per MoE layer and micro-batch (dispatch and combine, forward and backward) of the
             tokens' top-k copies, not hidden.

``memory_bytes`` adds the HBM-bound work (norms, activation functions, residual adds, softmax statistics) per
activation element and layer at the HBM bandwidth: it is why an H100 reaches a smaller share of its peak than
an A100 on the same model (twice the FLOPs per byte of HBM).

The seven constants (``Constants``) are fitted on ``pretrain/plan/data/published-training-points.csv``
(``python -m pretrain.plan fit``, Nelder–Mead) by minimising the median plus the 90th percentile of |error|;
they are global — no per-point, per-model or per-framework term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretrain.plan.hardware import GPU


@dataclass(frozen=True)
class Constants:
    """The model's free constants (``python -m pretrain.plan fit --points FILE.csv`` refits and prints them)."""

    bf16_efficiency: float = 0.88  # share of the GPU's large-GEMM throughput a whole model's matmuls reach
    fp8_efficiency: float = 0.68  # the same for FP8 linear layers (casts and scales included)
    attention_efficiency: float = 0.51  # share of the bf16 GEMM throughput fused attention (fwd + bwd) reaches
    width_half: float = 510.0  # per-GPU matmul width (d_model / tp) at which efficiency halves
    memory_bytes: float = 250.0  # HBM bytes moved per activation element per layer outside the matmuls
    tp_exposed: float = 0.14  # share of TP / SP communication not hidden
    dp_overlap: float = 1.0  # share of the compute that can hide DP / FSDP communication


FITTED = Constants()


@dataclass
class Shape:
    """A decoder (or encoder) as the planner sees it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    gated: bool = True  # SwiGLU: three FFN matrices
    experts: int = 0
    topk: int = 0
    expert_ffn: int = 0
    shared_experts: int = 0
    dense_layers: int = 0  # leading layers with a dense FFN in an MoE model
    head_dim_: int = 0  # 0: hidden / heads
    attention_params_: int = 0  # a block's attention weights when not q, k, v, o of head_dim (MLA); 0: those
    score_dim_: float = 0  # (q/k head dim + v head dim) / 2 of the attention products (MLA); 0: head_dim
    mtp: int = 0  # multi-token-prediction depths: a projection, a block and the head each

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    @property
    def score_dim(self) -> float:
        return self.score_dim_ or self.head_dim

    def layer_matmul_params(self, active: bool = True, moe: bool = False) -> int:
        d, e = self.hidden, self.head_dim
        attention = self.attention_params_ or d * self.heads * e * 2 + 2 * d * self.kv_heads * e
        if moe:
            n = self.topk if active else self.experts
            return attention + d * self.experts + 3 * d * self.expert_ffn * (n + self.shared_experts)
        return attention + (3 if self.gated else 2) * d * self.ffn

    def matmul_params(self, active: bool = True) -> int:
        moe_layers = self.layers - self.dense_layers if self.experts else 0
        mtp = self.mtp * (2 * self.hidden * self.hidden + self.layer_matmul_params(active, moe=bool(self.experts))
                          + self.hidden * self.vocab)
        return ((self.layers - moe_layers) * self.layer_matmul_params() +
                moe_layers * self.layer_matmul_params(active, moe=True) + self.hidden * self.vocab + mtp)

    def flops_per_token(self, seq: int) -> float:
        """Model FLOPs per token, forward + backward (as models/flops.py counts them)."""
        return 6 * self.matmul_params() + 12 * (self.layers + self.mtp) * self.heads * self.score_dim * seq


@dataclass
class Layout:
    gpus: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 1  # 0 DDP, 1 distributed optimizer, 2, 3 FSDP
    ac: str = "none"  # none | selective | full
    micro_batch: int = 1
    precision: str = "bf16"  # bf16 | fp8

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)


@dataclass
class Estimate:
    step_s: float
    tflops_per_gpu: float  # model FLOPs
    tokens_per_s: float  # whole job
    mfu: float  # against the bf16 peak
    parts: dict = field(default_factory=dict)  # seconds per term


def _ring(bytes_: float, n: int, bw_gb_s: float, factor: float = 2.0) -> float:
    """Ring collective over n ranks: factor (n − 1) / n · bytes / bandwidth (2 for an all-reduce)."""
    return 0.0 if n <= 1 else factor * (n - 1) / n * bytes_ / (bw_gb_s * 1e9)


def attention_density(seq: int, doc_len: int, causal: bool = True) -> float:
    """The share of the dense attention square (causal: its triangle) documents of ``doc_len`` tokens packed into
    rows of ``seq`` leave to compute (``data.document_mask``); 1 with no document length (0) or one row a document."""
    if doc_len <= 0 or doc_len >= seq:
        return 1.0
    return (doc_len + 1) / (seq + 1) if causal else doc_len / seq


def estimate(shape: Shape, layout: Layout, gpu: GPU, seq: int, global_batch: int,
             k: Constants = FITTED, density: float = 1.0) -> Estimate:
    """Predicted step of ``global_batch`` sequences of ``seq`` tokens; ``density``: the share of attention's dense
    FLOPs computed (document masking skips the rest; MFU keeps counting the dense FLOPs)."""
    lay = layout
    tokens = global_batch * seq
    per_gpu_model_flops = shape.flops_per_token(seq) * tokens / lay.gpus
    attention = 12 * (shape.layers + shape.mtp) * shape.heads * shape.score_dim * seq * tokens / lay.gpus
    linear = per_gpu_model_flops - attention
    redo = {"none": 0.0, "selective": attention / 3, "full": per_gpu_model_flops / 3}[lay.ac]
    width = shape.hidden / lay.tp
    size = width / (width + k.width_half)
    bf16 = gpu.gemm_bf16 * 1e12 * k.bf16_efficiency * size
    again = 1 + redo / per_gpu_model_flops
    attn = gpu.gemm_bf16 * 1e12 * k.attention_efficiency
    matmul = gpu.gemm_fp8 * 1e12 * k.fp8_efficiency * size if lay.precision == "fp8" else bf16
    compute = (linear / matmul + attention * density / attn) * again
    # norms, activations, residuals, softmax statistics: HBM-bound, per token and layer
    tokens_here = tokens / (lay.dp * lay.cp)
    elements = tokens_here * shape.layers / lay.pp * shape.hidden / lay.tp
    compute += elements * k.memory_bytes * again / (gpu.hbm_tb_s * 1e12)

    micro_batches = max(1, global_batch // (lay.dp * lay.micro_batch))
    act_bytes = lay.micro_batch * seq / lay.cp * shape.hidden * 2
    node = gpu.gpus_per_node
    tp_bw = gpu.nvlink_gb_s if lay.tp <= node else gpu.network_gb_s
    layers_here = shape.layers / lay.pp
    tp = k.tp_exposed * micro_batches * layers_here * 4 * _ring(act_bytes, lay.tp, tp_bw)

    bubble = (lay.pp - 1) / (lay.vpp * micro_batches) * (compute + tp) if lay.pp > 1 else 0.0

    params_here = shape.matmul_params(active=False) / (lay.tp * lay.pp)
    if shape.experts and lay.ep > 1:
        moe_layers = shape.layers - shape.dense_layers
        expert_w = moe_layers * 3 * shape.hidden * shape.expert_ffn * shape.experts / (lay.tp * lay.pp)
        params_here = params_here - expert_w + expert_w / lay.ep
    dp_span = lay.gpus // lay.dp  # ranks of one data-parallel replica: the dp group strides over them
    dp_bw = gpu.nvlink_gb_s if lay.dp * dp_span <= node else gpu.network_gb_s
    # ZeRO-3 gathers the weights for every micro-batch's forward and backward, ZeRO-2 for its forward (keeping
    # them through backward), and both reduce-scatter once a step; DDP / ZeRO-1 all-reduce once a step
    factor = {3: 2.0 * micro_batches + 1, 2: micro_batches + 1.0}.get(lay.zero, 2.0)
    dp_comm = _ring(params_here * 2, lay.dp, dp_bw, factor)
    dp = max(0.0, dp_comm - k.dp_overlap * compute)

    cp = 0.0
    if lay.cp > 1:
        kv = lay.micro_batch * seq / lay.cp * 2 * shape.kv_heads * shape.head_dim * 2
        cp_bw = gpu.nvlink_gb_s if lay.cp * lay.tp <= node else gpu.network_gb_s
        ring = micro_batches * layers_here * 3 * (lay.cp - 1) * kv / (cp_bw * 1e9)
        cp = max(0.0, ring - compute * attention / per_gpu_model_flops)

    ep = 0.0
    if shape.experts and lay.ep > 1:
        ep_bw = gpu.nvlink_gb_s if lay.ep * lay.tp <= node else gpu.network_gb_s
        moe_layers_here = (shape.layers - shape.dense_layers) / lay.pp
        ep = micro_batches * moe_layers_here * 4 * act_bytes * shape.topk * (lay.ep - 1) / lay.ep / (ep_bw * 1e9)

    step = compute + tp + bubble + dp + cp + ep
    model = per_gpu_model_flops / step
    return Estimate(step, model / 1e12, tokens / step, model / (gpu.bf16_tflops * 1e12),
                    {"compute": compute, "tp": tp, "bubble": bubble, "dp": dp, "cp": cp, "ep": ep})


def median_p90(errors: list[float]) -> tuple[float, float]:
    a = sorted(abs(e) for e in errors)
    if not a:
        return math.nan, math.nan

    def q(p):
        k = (len(a) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return a[lo] + (a[hi] - a[lo]) * (k - lo)

    return q(0.5), q(0.9)


def fit(points, start: Constants = FITTED, iterations: int = 600) -> tuple[Constants, float, float]:
    """Nelder–Mead over the constants (log scale, clamped to physical bounds) minimising median + p90 of
    |predicted / published − 1| over ``points`` (points.Point); returns (constants, median, p90)."""
    from dataclasses import astuple, fields

    names = [f.name for f in fields(Constants)]
    bounds = {"bf16_efficiency": (0.2, 1.0), "fp8_efficiency": (0.1, 1.0), "attention_efficiency": (0.1, 1.0),
              "width_half": (1.0, 5000.0), "memory_bytes": (1.0, 1000.0), "tp_exposed": (0.01, 1.0),
              "dp_overlap": (0.01, 1.0)}

    def constants(x):
        return Constants(*(min(max(math.exp(v), bounds[n][0]), bounds[n][1]) for n, v in zip(names, x)))

    def score(x):
        k = constants(x)
        errors = [estimate(p.shape, p.layout, p.gpu, p.seq, p.global_batch, k).tflops_per_gpu / p.tflops - 1
                  for p in points]
        med, p90 = median_p90(errors)
        return med + p90

    x0 = [math.log(v) for v in astuple(start)]
    simplex = [x0] + [[v + (0.3 if i == j else 0.0) for j, v in enumerate(x0)] for i in range(len(x0))]
    values = [score(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(len(simplex)), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centre = [sum(x[j] for x in simplex[:-1]) / (len(simplex) - 1) for j in range(len(x0))]
        worst = simplex[-1]
        reflect = [c + (c - w) for c, w in zip(centre, worst)]
        fr = score(reflect)
        if fr < values[0]:
            expand = [c + 2 * (c - w) for c, w in zip(centre, worst)]
            fe = score(expand)
            simplex[-1], values[-1] = (expand, fe) if fe < fr else (reflect, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflect, fr
        else:
            contract = [c + 0.5 * (w - c) for c, w in zip(centre, worst)]
            fc = score(contract)
            if fc < values[-1]:
                simplex[-1], values[-1] = contract, fc
            else:  # shrink towards the best
                simplex = [simplex[0]] + [[b + 0.5 * (v - b) for b, v in zip(simplex[0], x)] for x in simplex[1:]]
                values = [values[0]] + [score(x) for x in simplex[1:]]
    best = constants(simplex[min(range(len(values)), key=values.__getitem__)])
    errors = [estimate(p.shape, p.layout, p.gpu, p.seq, p.global_batch, best).tflops_per_gpu / p.tflops - 1
              for p in points]
    med, p90 = median_p90(errors)
    return best, med, p90
