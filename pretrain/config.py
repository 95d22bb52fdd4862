"""One dataclass tree for every run: defaults < TOML preset < ``--set section.key=value`` overrides.

All validation lives here (``Config.validate``) and runs at load time, so a bad run fails in the first second
with one line naming the key, never an hour in. The resolved config is written to the run dir and into every
checkpoint (``to_toml``), and reloads to an equal ``Config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pretrain.errors import ConfigError  # re-exported: raised here, defined with the other user errors

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib




@dataclass
class ModelConfig:
    arch: str = "gpt"  # gpt | bert
    flavor: str = "llama"  # llama | gpt2 (gpt only)
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (no GQA)
    head_dim: int = 0  # width of one attention head; 0 = d_model / n_heads (Qwen3-0.6B: 128 with d_model 1024, 16 heads)
    ffn_hidden: int = 0  # 0 = flavour default (llama: 8/3·D rounded to 64; gpt2/bert: 4·D)
    vocab_size: int = 512
    seq_len: int = 128
    max_position_embeddings: int = 0  # learned positions (gpt2, bert); 0 = seq_len
    rope_theta: float = 10000.0
    # RoPE frequency scaling as Hugging Face configs write it ({} = none): {rope_type = "linear", factor = 4.0};
    # {rope_type = "llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings};
    # {rope_type = "yarn", factor, original_max_position_embeddings, beta_fast?, beta_slow?, attention_factor?,
    # mscale?, mscale_all_dim?, truncate?} (pretrain/models/rope.py)
    rope_scaling: dict = field(default_factory=dict)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False  # llama GPT: RMSNorm over each head's q and k before RoPE (Qwen3, OLMoE-style)
    qkv_bias: bool = False  # llama GPT: biases on the q, k and v projections (not o), as Qwen2 / Qwen2.5 have
    # attention: "mha" (multi-head, grouped-query with n_kv_heads) | "mla" (DeepSeek-V2/V3 multi-head latent attention:
    # q through a q_lora_rank bottleneck with its RMSNorm (0: one q projection, V2-Lite), k and v from a kv_lora_rank
    # latent with its RMSNorm, heads of qk_nope_head_dim + qk_rope_head_dim (the RoPE part: one rotary key shared by
    # the heads) for q and k and v_head_dim for v; pretrain/models/mla.py)
    attention: str = "mha"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # multi-token prediction (DeepSeek-V3): mtp_depth sequential modules, depth k predicting the token k + 1 ahead;
    # their summed cross-entropies enter the objective times mtp_loss_coef / mtp_depth (models/gpt.py: MTPModule)
    mtp_depth: int = 0
    mtp_loss_coef: float = 0.3
    hf_architecture: str = ""  # the Hugging Face class an import came from (export writes it again); "" = chosen by shape
    # GPT under bf16 autocast: keep the residual stream (embeddings, the blocks' sums, what pipeline stages send) in
    # fp32; false (the default): bf16, as Megatron-LM's default and torchtitan's bf16 parameters have it
    fp32_residual: bool = False
    dropout: float = 0.0
    type_vocab_size: int = 2  # bert
    nsp_head: bool = False  # bert: next-sentence prediction head
    init_std: float = 0.02
    kernels: str = "torch"  # torch | triton | ops from triton, e.g. "attention,rms_norm,cross_entropy"
    # Mixture-of-Experts (llama flavour; pretrain/models/moe.py). n_experts = 0: every layer dense
    n_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden: int = 0  # each expert's SwiGLU width (0 = ffn_hidden's resolved width)
    n_shared_experts: int = 0  # always-on experts of moe_ffn_hidden each (DeepSeek)
    moe_dense_layers: int = 0  # the first k layers keep a dense MLP (DeepSeek's first_k_dense_replace)
    moe_router: str = "softmax"  # softmax (Mixtral / Qwen-MoE) | sigmoid (DeepSeek-V3)
    moe_balance: str = "aux_loss"  # aux_loss (Switch) | bias (DeepSeek-V3 aux-loss-free) | both
    moe_aux_coef: float = 0.01  # weight of the auxiliary balancing loss
    moe_z_coef: float = 0.001  # weight of the router z-loss (0 = off)
    moe_bias_rate: float = 0.001  # step of the aux-loss-free bias update
    moe_aux_scope: str = "sequence"  # the aux loss's f and P per sequence (DeepSeek-V3) | per micro_batch (Switch)
    moe_capacity_factor: float = 0.0  # 0 = dropless; else each expert takes ceil(cf · N·k / E) slots, the rest drop
    # group-limited routing (DeepSeek-V3's node-limited): the experts in moe_n_group groups, a group's score the sum of
    # its two best (bias-corrected) scores, the top_k chosen within the moe_topk_group best groups
    moe_n_group: int = 1
    moe_topk_group: int = 1
    moe_routed_scaling: float = 1.0  # the routed experts' weights multiplied by it (DeepSeek-V3: 2.5)

    @property
    def expert_dim(self) -> int:
        return self.moe_ffn_hidden or self.ffn_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mla(self) -> bool:
        return self.attention == "mla"

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query and key: MLA's no-RoPE and RoPE parts, else the head dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.mla else self.head_size

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.mla else self.head_size

    @property
    def rotary_dim(self) -> int:
        """The dims RoPE rotates in a head: MLA's RoPE part, else the whole head."""
        return self.qk_rope_head_dim if self.mla else self.head_size

    @property
    def head_size(self) -> int:
        """The resolved ``head_dim``."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.arch == "gpt" and self.flavor == "llama":
            return 64 * math.ceil(int(8 * self.d_model / 3) / 64)
        return 4 * self.d_model

    @property
    def positions(self) -> int:
        return self.max_position_embeddings or self.seq_len

    @property
    def learned_positions(self) -> bool:
        return self.arch == "bert" or self.flavor == "gpt2"


@dataclass
class DataConfig:
    source: str = "synthetic"  # shards | synthetic | megatron
    path: str = ""  # prepared dir (manifest.json inside) or, for megatron, a .bin/.idx prefix
    sources: list = field(default_factory=list)  # blend: [{path = "...", weight = 0.7}, ...] instead of path
    tokenizer: str = ""  # sentencepiece model; "" = the one in the prepared dir
    num_workers: int = 0  # DataLoader worker processes per rank (0 = read in the training process)
    prefetch_factor: int = 2  # batches in flight per worker
    seed: int = 1234
    shuffle: bool = True
    shuffle_window: int = 65536  # samples shuffled together (a full permutation inside each window)
    on_bad_sample: str = "error"  # error | skip (masked out of the loss, counted in metrics as data_skipped)
    mlm_probability: float = 0.15  # bert
    max_predictions_per_seq: int = 0  # bert: cap on masked positions per sequence (0 = no cap)
    whole_word_mask: bool = False  # bert: mask whole words
    bert_pairs: str = "none"  # bert: none | nsp | sop (sentence pairs; needs model.nsp_head)
    # packed documents attend only within themselves: each sample carries per-token document ids (data/samples.py)
    document_mask: bool = False
    reset_positions: bool = False  # positions (RoPE, learned) restart at each document (needs document_mask)
    # the target of a document's last token (its EOS) is the next document's first token: true leaves it out of
    # the loss (needs document_mask)
    mask_document_boundary: bool = False
    synthetic_doc_len: int = 0  # data.source = "synthetic" with document_mask: mean document length (0: seq_len / 4)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1 = whatever world size is left
    ep: int = 1  # expert parallelism: MoE experts split over ep ranks taken from dp_shard
    cp: int = 1  # context parallelism: each sequence split over cp ranks (zigzag chunks)
    cp_impl: str = "ring"  # ring (K/V blocks around the cp ranks) | alltoall (heads <-> sequence, Ulysses)
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    n_microbatches: int = 0
    stages_per_rank: int = 2  # virtual pipeline stages per rank for interleaved_1f1b and zbv
    zero_stage: int = 0  # 0 DDP, 1 + sharded optimizer state, 2 + sharded grads (FSDP2), 3 + sharded params
    sequence_parallel: bool = True  # with tp > 1: norms and residuals sharded over the sequence
    cpu_offload: bool = False  # FSDP: parameters, gradients and optimizer state on the CPU
    meta_init: bool = True  # build on the meta device and initialise each shard in place (false: build whole)
    engine: str = "native"  # native | deepspeed
    deepspeed_config: str = ""  # a ds_config JSON; default: built from this config
    activation_checkpointing: str = "none"  # none | full | selective
    activation_checkpointing_every: int = 2  # selective: checkpoint every k-th block


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW for the rest; pretrain/muon.py)
    impl: str = "torch"  # torch | triton | apex (AdamW's implementation)
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    muon_lr: float = 0.0  # Muon's peak LR (0 = optim.lr), following the same schedule
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton–Schulz iterations
    muon_ns_dtype: str = "bf16"  # bf16 (fast, torch.optim.Muon's) | fp32 (layouts agree to fp32 rounding)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | wsd | constant
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 1234
    dtype: str = "fp32"  # fp32 | bf16 (autocast on CUDA)
    # bf16: auto | weights (bf16 compute copies of the matmul weights over fp32 masters, FSDP's policy where
    # sharded) | autocast (autocast over fp32 weights) — pretrain/parallel/mixed_precision.py
    mixed_precision: str = "auto"
    # bf16 weight copies: the micro-batches' gradients summed in fp32 (default, as Megatron-LM's main grads and
    # FSDP2's reduce dtype) or bf16 (the GEMM adds into its own output: faster, bf16's precision)
    grad_accum_dtype: str = "fp32"
    compile: bool = False
    fp8: str = "none"  # none | tensorwise | rowwise: Linear matmuls in FP8 (torchao; emulated off CUDA sm_89+)
    fp8_all_gather: str = "auto"  # auto | on | off: FSDP gathers FP8 weights as float8 (tensorwise, NCCL only)
    fp8_keep_edge_blocks: int = 1  # blocks at each end left in high precision under fp8
    fp8_exclude: list = field(default_factory=list)  # more module-name patterns left in high precision
    device: str = "auto"  # auto | cpu | cuda
    max_nonfinite_steps: int = 5  # a non-finite loss or grad norm skips the update; this many in a row aborts
    collective_timeout_s: float = 600.0  # a collective waiting longer fails the run instead of hanging it
    inject_nan_steps: list = field(default_factory=list)  # fault drill: these steps' loss is NaN on every rank


@dataclass
class EvalConfig:
    interval: int = 0  # 0 = off
    steps: int = 10
    # downstream tasks: JSONL files (pretrain/downstream.py), scored in the loop every downstream_interval steps
    tasks: list = field(default_factory=list)
    downstream_interval: int = 0  # 0 = eval.interval (and at the last step either way)


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" = RUN_DIR/checkpoints
    interval: int = 0  # 0 = off (a final checkpoint is still written when dir is set explicitly)
    keep_last: int = 3
    keep_every: int = 0  # also keep every step divisible by this for good (0 = off)
    async_save: bool = False  # write in the background (at most one save in flight); training goes on
    resume: str = "auto"  # auto (latest in dir, if any) | never | a step directory
    hf_interval: int = 0  # also write a Hugging Face copy every this many steps (0 = off), beside the native step
    hf_at_end: bool = False  # also write a Hugging Face copy of the last step
    hf_dir: str = ""  # where the copies go, one folder per step; "" = RUN_DIR/hf


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    interval: int = 10
    tensorboard: bool = True
    wandb_project: str = ""
    peak_tflops: float = 0.0  # 0 = look the device up in the table (MFU is null when unknown)
    heartbeat_s: float = 300.0  # a "still in step N" line when a step runs longer than this (0 = off)
    measure_peak: bool = False  # MFU over this device's measured dense-matmul TFLOP/s instead of the table's
    profile_steps: str = ""  # "5-7": a torch profiler trace of steps 5 to 7 in RUN_DIR/profile/ ("" = off)


@dataclass
class PlanConfig:
    gpu: str = ""  # the GPU type --check fits the layout to (h100, h200, ...); "" = this machine's, if any
    force: bool = False  # launch even where the planner predicts the layout does not fit
    usable_fraction: float = 0.92  # of the GPU's memory a run can use (CUDA context, allocator slack)
    # the mean document length the step-time model assumes with data.document_mask (0: synthetic data's
    # data.synthetic_doc_len, else dense attention: an upper bound on the step)
    mean_doc_len: int = 0


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "plan": PlanConfig,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("gpt", "bert"),
    "model.flavor": ("llama", "gpt2"),
    "model.moe_router": ("softmax", "sigmoid"),
    "model.attention": ("mha", "mla"),
    "model.moe_balance": ("aux_loss", "bias", "both"),
    "model.moe_aux_scope": ("sequence", "micro_batch"),
    "data.source": ("shards", "synthetic", "megatron"),
    "data.on_bad_sample": ("error", "skip"),
    "data.bert_pairs": ("none", "nsp", "sop"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b", "zbv"),
    "parallel.engine": ("native", "deepspeed"),
    "parallel.cp_impl": ("ring", "alltoall"),
    "parallel.activation_checkpointing": ("none", "full", "selective"),
    "optim.impl": ("torch", "triton", "apex"),
    "optim.name": ("adamw", "muon"),
    "optim.muon_ns_dtype": ("bf16", "fp32"),
    "schedule.decay": ("cosine", "linear", "wsd", "constant"),
    "train.dtype": ("fp32", "bf16"),
    "train.mixed_precision": ("auto", "weights", "autocast"),
    "train.grad_accum_dtype": ("fp32", "bf16"),
    "train.fp8": ("none", "tensorwise", "rowwise"),
    "train.fp8_all_gather": ("auto", "on", "off"),
    "train.device": ("auto", "cpu", "cuda"),
}


# Valid ranges of numeric fields: (low, high), each None (unbounded) or (bound, inclusive). Cross-field rules
# (min_lr <= lr, d_model divisible by n_heads, ...) are in Config.validate.
POSITIVE, NON_NEGATIVE, AT_LEAST_1 = ((0, False), None), ((0, True), None), ((1, True), None)
UNIT_OPEN = ((0, True), (1, False))  # [0, 1)
RANGES: dict[str, tuple] = {
    "model.n_layers": AT_LEAST_1, "model.d_model": AT_LEAST_1, "model.n_heads": AT_LEAST_1,
    "model.n_kv_heads": NON_NEGATIVE, "model.head_dim": NON_NEGATIVE, "model.ffn_hidden": NON_NEGATIVE, "model.vocab_size": ((2, True), None),
    "model.seq_len": AT_LEAST_1, "model.max_position_embeddings": NON_NEGATIVE, "model.rope_theta": POSITIVE,
    "model.norm_eps": POSITIVE, "model.dropout": UNIT_OPEN, "model.type_vocab_size": AT_LEAST_1,
    "model.init_std": POSITIVE, "model.n_experts": NON_NEGATIVE, "model.moe_top_k": AT_LEAST_1,
    "model.moe_ffn_hidden": NON_NEGATIVE, "model.n_shared_experts": NON_NEGATIVE,
    "model.moe_dense_layers": NON_NEGATIVE, "model.moe_aux_coef": NON_NEGATIVE, "model.moe_z_coef": NON_NEGATIVE,
    "model.moe_bias_rate": NON_NEGATIVE, "model.moe_capacity_factor": NON_NEGATIVE, "model.moe_n_group": AT_LEAST_1,
    "model.moe_topk_group": AT_LEAST_1, "model.moe_routed_scaling": POSITIVE, "model.q_lora_rank": NON_NEGATIVE,
    "model.kv_lora_rank": NON_NEGATIVE, "model.qk_nope_head_dim": NON_NEGATIVE, "model.qk_rope_head_dim": NON_NEGATIVE,
    "model.v_head_dim": NON_NEGATIVE, "model.mtp_depth": NON_NEGATIVE, "model.mtp_loss_coef": NON_NEGATIVE,
    "data.num_workers": NON_NEGATIVE, "data.prefetch_factor": AT_LEAST_1, "data.seed": NON_NEGATIVE,
    "data.shuffle_window": AT_LEAST_1, "data.mlm_probability": ((0, False), (1, False)),
    "data.max_predictions_per_seq": NON_NEGATIVE,
    "parallel.dp_replicate": AT_LEAST_1, "parallel.ep": AT_LEAST_1, "parallel.cp": AT_LEAST_1,
    "parallel.tp": AT_LEAST_1, "parallel.pp": AT_LEAST_1,
    "parallel.n_microbatches": NON_NEGATIVE, "parallel.stages_per_rank": AT_LEAST_1,
    "parallel.activation_checkpointing_every": AT_LEAST_1,
    "optim.lr": POSITIVE, "optim.min_lr": NON_NEGATIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": UNIT_OPEN, "optim.beta2": UNIT_OPEN, "optim.eps": POSITIVE, "optim.grad_clip": NON_NEGATIVE,
    "optim.muon_lr": NON_NEGATIVE, "optim.muon_momentum": UNIT_OPEN, "optim.muon_ns_steps": AT_LEAST_1,
    "schedule.warmup_steps": NON_NEGATIVE, "schedule.decay_fraction": ((0, False), (1, True)),
    "train.steps": AT_LEAST_1, "train.micro_batch_size": AT_LEAST_1, "train.grad_accum": AT_LEAST_1,
    "train.seed": NON_NEGATIVE, "train.fp8_keep_edge_blocks": NON_NEGATIVE, "train.max_nonfinite_steps": AT_LEAST_1, "train.collective_timeout_s": POSITIVE,
    "eval.interval": NON_NEGATIVE, "eval.steps": NON_NEGATIVE,
    "checkpoint.interval": NON_NEGATIVE, "checkpoint.keep_last": NON_NEGATIVE, "checkpoint.keep_every": NON_NEGATIVE,
    "checkpoint.hf_interval": NON_NEGATIVE,
    "plan.usable_fraction": ((0, False), (1, True)),
    "logging.interval": NON_NEGATIVE, "logging.peak_tflops": NON_NEGATIVE, "logging.heartbeat_s": NON_NEGATIVE,
}


def _in_range(value, low, high) -> bool:
    if low is not None and (value < low[0] or (value == low[0] and not low[1])):
        return False
    return high is None or value < high[0] or (value == high[0] and high[1])


def _describe_range(low, high) -> str:
    if high is None:
        return f"{'>=' if low[1] else '>'} {low[0]}"
    return f"in {'[' if low[1] else '('}{low[0]}, {high[0]}{']' if high[1] else ')'}"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.run_dir) / "checkpoints"

    @property
    def hf_dir(self) -> Path:
        return Path(self.checkpoint.hf_dir) if self.checkpoint.hf_dir else Path(self.logging.run_dir) / "hf"

    def inert(self) -> list[str]:
        """One line for each key set away from its default that this config never reads (a feature left off):
        said aloud at start and by ``--check``, not refused — a config may carry them for a later run."""
        m, o, t, p = self.model, self.optim, self.train, self.parallel
        off = [
            ("model", "moe_", not m.n_experts, "model.n_experts = 0"),
            ("model", "n_shared_experts", not m.n_experts, "model.n_experts = 0"),
            *[("model", key, not m.mla, f"model.attention = {m.attention!r}") for key in MLA_KEYS],
            ("model", "mtp_loss_coef", not m.mtp_depth, "model.mtp_depth = 0"),
            ("optim", "muon_", o.name != "muon", f"optim.name = {o.name!r}"),
            ("train", "fp8_", t.fp8 == "none", 'train.fp8 = "none"'),
            ("train", "mixed_precision", t.dtype != "bf16", f"train.dtype = {t.dtype!r}"),
            ("parallel", "cp_impl", p.cp == 1, "parallel.cp = 1"),
            ("plan", "mean_doc_len", not self.data.document_mask, "data.document_mask = false"),
            ("data", "synthetic_doc_len", self.data.source != "synthetic" or not self.data.document_mask,
             "it sizes synthetic documents (data.source = \"synthetic\" with data.document_mask = true)"),
            ("parallel", "pp_schedule", p.pp == 1, "parallel.pp = 1"),
            ("parallel", "n_microbatches", p.pp == 1, "parallel.pp = 1"),
            ("parallel", "stages_per_rank", p.pp == 1, "parallel.pp = 1"),
        ]
        lines = []
        for section, prefix, inactive, because in off:
            if not inactive:
                continue
            ours, default = getattr(self, section), type(getattr(self, section))()
            for f in fields(ours):
                if f.name.startswith(prefix) and getattr(ours, f.name) != getattr(default, f.name):
                    lines.append(f"{section}.{f.name} = {getattr(ours, f.name)!r} has no effect: {because}")
        return lines

    def validate(self) -> Config:
        """Every rule of ``RULES`` in order (finiteness and the ranges of ``RANGES`` first, then choices and the
        rules between fields), each failing with one line that names the key. Rules that need the world size live
        in ``ParallelDims.from_config``."""
        for rule in RULES:
            rule(self)
        return self


KERNEL_OPS = ("attention", "rms_norm", "layer_norm", "rotary", "cross_entropy", "swiglu")  # models/ops.py's Triton ops


def triton_ops(kernels: str) -> set[str]:
    """The ops ``model.kernels`` takes from Triton; ValueError names an unknown one."""
    if kernels == "torch":
        return set()
    if kernels == "triton":
        return set(KERNEL_OPS)
    chosen = {name.strip() for name in kernels.split(",") if name.strip()}
    unknown = sorted(chosen - set(KERNEL_OPS))
    if unknown or not chosen:
        raise ValueError(f"model.kernels = {kernels!r}: expected torch, triton, or a comma-separated list of "
                         f"{', '.join(KERNEL_OPS)}")
    return chosen


# model.rope_scaling: per type, its required keys and its optional ones (the keys Hugging Face configs use)
ROPE_SCALING = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}),
}


def check_rope_scaling(scaling: dict) -> None:
    """One line naming what is wrong with a ``model.rope_scaling`` table (models/rope.py computes it)."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING:
        raise ConfigError(f"model.rope_scaling.rope_type = {kind!r} is not one of {', '.join(ROPE_SCALING)} "
                          "(use {} for plain RoPE)")
    required, optional = ROPE_SCALING[kind]
    keys = set(scaling) - {"rope_type", "type"}
    if required - keys:
        raise ConfigError(f"model.rope_scaling ({kind}) lacks {', '.join(sorted(required - keys))}")
    if keys - required - optional:
        raise ConfigError(f"model.rope_scaling ({kind}) has unknown key(s) {', '.join(sorted(keys - required - optional))}"
                          f"; {kind} takes {', '.join(sorted(required | optional))}")
    for key in keys:
        value = scaling[key]
        if key == "truncate":
            if not isinstance(value, bool):
                raise ConfigError(f"model.rope_scaling.truncate must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0 and not (key in ("mscale", "mscale_all_dim") and value == 0):
            raise ConfigError(f"model.rope_scaling.{key} must be a finite number > 0, got {value!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"model.rope_scaling: high_freq_factor ({scaling['high_freq_factor']}) must exceed "
                          f"low_freq_factor ({scaling['low_freq_factor']})")


# --- the rules Config.validate runs, each on one concern -----------------------------------------------------
def _finite(cfg: Config) -> None:
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")


def _ranges(cfg: Config) -> None:
    for key, (low, high) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not _in_range(value, low, high):
            raise ConfigError(f"{key} must be {_describe_range(low, high)}, got {value}")


def _choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")


def _kernels(cfg: Config) -> None:
    m = cfg.model
    try:
        chosen = triton_ops(m.kernels)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if "attention" in chosen and m.dropout:
        raise ConfigError("the Triton attention has no dropout: set model.dropout = 0 or keep attention on torch")
    sharded_norms = (cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel and m.arch == "gpt"
                     and not m.tie_embeddings)  # parallel/dims.vocab_parallel: the norms sharded over the sequence
    if chosen & {"rms_norm", "layer_norm"} and sharded_norms:
        raise ConfigError("the Triton norms take whole tensors, not the sequence shards of parallel.sequence_parallel: "
                          "set parallel.sequence_parallel = false or drop rms_norm / layer_norm from model.kernels")
    if "attention" in chosen:
        for what, dim in (("query/key head dim", m.qk_head_dim), ("value head dim", m.value_head_dim)):
            if dim > 256:  # pretrain/kernels/attention.py MAX_HEAD_DIM (not imported: it needs triton)
                raise ConfigError(f"the Triton attention takes head dims up to 256 (the widest whose tiles fit shared "
                                  f"memory on sm_80); this model's {what} is {dim}: keep attention on torch "
                                  f"(model.kernels)")
    if "cross_entropy" in chosen and cfg.parallel.tp > 1:
        raise ConfigError("the fused cross-entropy kernel takes a whole head: with parallel.tp > 1 the "
                          "vocab-parallel loss is used; drop cross_entropy from model.kernels")


def _mixed_precision(cfg: Config) -> None:
    if cfg.train.mixed_precision != "weights" or (cfg.train.dtype == "bf16" and cfg.parallel.zero_stage >= 2
                                                   and cfg.parallel.engine == "native"):
        return  # FSDP's policy where it shards
    from pretrain.parallel.mixed_precision import not_covered

    why = not_covered(cfg)
    if why:
        raise ConfigError(f'train.mixed_precision = "weights" (bf16 compute weights over fp32 masters): {why}; '
                          'use "auto" or "autocast"')


def _heads(cfg: Config) -> None:
    m = cfg.model
    if m.mla:
        return  # its head dims are its own keys (_latent_attention)
    llama = m.arch == "gpt" and m.flavor == "llama"
    if m.head_dim and not llama:
        raise ConfigError(f"model.head_dim is for the llama-flavour GPT (its heads may be wider or narrower than "
                          f"d_model / n_heads); {m.arch}/{m.flavor} heads are d_model / n_heads")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}), or "
                          "set model.head_dim")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    if llama and m.head_size % 2:
        source = "model.head_dim" if m.head_dim else "d_model/n_heads"
        raise ConfigError(f"rotary embeddings need an even head dim; {source} = {m.head_size}")


MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _latent_attention(cfg: Config) -> None:
    """model.attention = "mla": its dims, and what it does not combine with (yet)."""
    m, p = cfg.model, cfg.parallel
    if not m.mla:
        return
    if m.arch != "gpt" or m.flavor != "llama":
        raise ConfigError(f'model.attention = "mla" is for the llama-flavour GPT, not {m.arch}/{m.flavor}')
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if not getattr(m, key):
            raise ConfigError(f'model.attention = "mla" needs model.{key} > 0')
    if m.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim ({m.qk_rope_head_dim}) must be even (rotary pairs)")
    if m.n_kv_heads not in (0, m.n_heads):
        raise ConfigError(f'model.attention = "mla" has no key/value heads to group (every head gets its own from '
                          f"the latent): model.n_kv_heads must be 0, got {m.n_kv_heads}")
    for key, why in (("head_dim", "MLA's heads are qk_nope_head_dim + qk_rope_head_dim and v_head_dim wide"),
                     ("qk_norm", "MLA normalises its latents, not the heads"),
                     ("qkv_bias", "MLA's projections have no biases")):
        if getattr(m, key):
            raise ConfigError(f'model.{key} does not combine with model.attention = "mla": {why}')
    if p.tp > 1 and m.n_heads % p.tp:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by parallel.tp ({p.tp}): MLA splits heads")


def _multi_token(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if not m.mtp_depth:
        return
    if m.arch != "gpt" or m.flavor != "llama":
        raise ConfigError(f"model.mtp_depth is for the llama-flavour GPT, not {m.arch}/{m.flavor}")
    if p.pp > 1 and p.pp_schedule == "zbv":
        raise ConfigError(f'model.mtp_depth = {m.mtp_depth} with parallel.pp_schedule = "zbv" is not supported yet (its '
                          "split backward, input gradients then weight gradients, fails on the MTP chain); use "
                          '"1f1b", "gpipe" or "interleaved_1f1b"')


def _llama_features(cfg: Config) -> None:
    """q/k/v biases, RoPE scaling and QK-norm belong to the llama-flavour GPT."""
    m = cfg.model
    if m.arch == "gpt" and m.flavor == "llama":
        if m.rope_scaling:
            check_rope_scaling(m.rope_scaling)
        return
    if m.qkv_bias:
        raise ConfigError(f"model.qkv_bias is for the llama-flavour GPT; {m.arch}/{m.flavor} projections "
                          "already have biases")
    if m.rope_scaling:
        raise ConfigError(f"model.rope_scaling is for the llama-flavour GPT (RoPE), not {m.arch}/{m.flavor}")
    if m.qk_norm:
        raise ConfigError(f"model.qk_norm is for the llama-flavour GPT, not {m.arch}/{m.flavor}")


def _positions(cfg: Config) -> None:
    m = cfg.model
    if m.learned_positions and m.seq_len > m.positions:
        raise ConfigError(f"model.seq_len ({m.seq_len}) exceeds model.max_position_embeddings ({m.positions}) "
                          f"of this {m.arch if m.arch == 'bert' else 'gpt2'} model")
    if m.arch == "bert" and m.flavor not in ("llama", "gpt2"):
        raise ConfigError(f"model.flavor = {m.flavor!r} is not one of llama, gpt2")


def _experts(cfg: Config) -> None:
    m = cfg.model
    if not m.n_experts:
        if cfg.parallel.ep > 1:
            raise ConfigError(f"parallel.ep = {cfg.parallel.ep} splits MoE experts, but model.n_experts = 0")
        return
    if m.arch != "gpt" or m.flavor != "llama":
        raise ConfigError(f"model.n_experts = {m.n_experts}: Mixture-of-Experts layers are for the llama-flavour "
                          f"GPT, not {m.arch}/{m.flavor}")
    if m.moe_top_k > m.n_experts:
        raise ConfigError(f"model.moe_top_k ({m.moe_top_k}) exceeds model.n_experts ({m.n_experts})")
    if m.moe_dense_layers >= m.n_layers:
        raise ConfigError(f"model.moe_dense_layers ({m.moe_dense_layers}) leaves no MoE layer of "
                          f"model.n_layers ({m.n_layers})")
    if 0 < m.moe_capacity_factor < 1:
        raise ConfigError(f"model.moe_capacity_factor = {m.moe_capacity_factor} would drop tokens even under "
                          "perfect balance: use 0 (dropless) or >= 1")
    if m.n_experts % m.moe_n_group:
        raise ConfigError(f"model.moe_n_group ({m.moe_n_group}) does not divide model.n_experts ({m.n_experts})")
    if m.moe_topk_group > m.moe_n_group:
        raise ConfigError(f"model.moe_topk_group ({m.moe_topk_group}) exceeds model.moe_n_group ({m.moe_n_group})")
    if m.moe_n_group > 1 and m.moe_top_k > m.moe_topk_group * (m.n_experts // m.moe_n_group):
        raise ConfigError(f"model.moe_top_k ({m.moe_top_k}) exceeds the experts of model.moe_topk_group "
                          f"({m.moe_topk_group}) groups of {m.n_experts // m.moe_n_group}")


def _drills(cfg: Config) -> None:
    t = cfg.train
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in t.inject_nan_steps):
        raise ConfigError(f"train.inject_nan_steps must be a list of step numbers >= 1, got {t.inject_nan_steps!r}")
    profile_range(cfg.logging.profile_steps)


def _optimizer(cfg: Config) -> None:
    o, p = cfg.optim, cfg.parallel
    if o.min_lr > o.lr:  # each alone is range-checked above
        raise ConfigError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr (lr={o.lr}, min_lr={o.min_lr})")
    if o.name == "muon" and o.impl != "torch":
        raise ConfigError(f'optim.name = "muon" has its own update for every parameter: optim.impl = '
                          f'"{o.impl}" does not apply; set optim.impl = "torch"')
    if o.name == "muon" and p.zero_stage == 1:
        raise ConfigError('optim.name = "muon" with parallel.zero_stage = 1: ZeRO-1 splits the optimizer '
                          "by whole tensors for AdamW only; use zero_stage 0, 2 or 3")
    if o.impl == "triton" and p.zero_stage == 1 and p.engine == "native":  # kernels/adamw.py: each rank's shard
        raise ConfigError('optim.impl = "triton" does not combine with parallel.zero_stage = 1 (ZeRO-1 '
                          'steps torch\'s AdamW on whole tensors); use zero_stage 0, 2 or 3, or "torch"')
    if o.impl == "triton" and p.cpu_offload and p.engine == "native":
        raise ConfigError('optim.impl = "triton" with parallel.cpu_offload = true: the offloaded optimizer '
                          'steps on the CPU, where Triton kernels do not run; set optim.impl = "torch"')
    t = cfg.train
    if t.fp8 != "none" and (not isinstance(t.fp8_exclude, list) or not all(isinstance(x, str) for x in t.fp8_exclude)):
        raise ConfigError(f"train.fp8_exclude must be a list of module-name patterns, got {t.fp8_exclude!r}")


def _deepspeed(cfg: Config) -> None:
    """DeepSpeed's engine is pure data parallelism around our model and AdamW: everything else needs ours."""
    p, o, t, m = cfg.parallel, cfg.optim, cfg.train, cfg.model
    if p.engine != "deepspeed":
        return
    refusals = [
        (m.n_experts, 'MoE layers train with parallel.engine = "native" (DeepSpeed\'s engine does not carry their '
                      "balancing terms)"),
        (t.inject_nan_steps, 'train.inject_nan_steps drills the native engine: it needs parallel.engine = "native"'),
        (o.name == "muon", 'optim.name = "muon" runs on the native engine: set parallel.engine = "native"'),
        (o.impl == "triton", 'optim.impl = "triton" runs on the native engine (DeepSpeed wraps its own fused Adam): '
                             'set optim.impl = "torch" with parallel.engine = "deepspeed"'),
        (t.fp8 != "none", 'train.fp8 runs on the native engine: set parallel.engine = "native"'),
        (p.tp * p.pp > 1, 'parallel.engine = "deepspeed" is for pure data parallelism: tp and pp must be 1'),
        (p.cp > 1, 'parallel.engine = "deepspeed" is for pure data parallelism: parallel.cp must be 1'),
    ]
    for used, message in refusals:
        if used:
            raise ConfigError(message)


def _zero_stage(cfg: Config) -> None:
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError("parallel.dp_shard must be >= 1, or -1 for the rest of the world, got "
                          f"{cfg.parallel.dp_shard}")


def _data(cfg: Config) -> None:
    d = cfg.data
    if d.source in ("shards", "megatron") and not (d.path or d.sources):
        raise ConfigError(f'data.source = "{d.source}" needs data.path (a directory made by '
                          "tools/prepare_data.py) or data.sources")
    if d.path and d.sources:
        raise ConfigError('data.sources (a blend) replaces data.path: set data.path = "" with it')
    if d.sources and d.source == "synthetic":
        raise ConfigError('data.sources needs data.source = "shards" or "megatron"')
    for i, src in enumerate(d.sources):
        if not isinstance(src, dict) or set(src) - {"path", "weight"} or "path" not in src:
            raise ConfigError(f"data.sources[{i}] must be {{path = \"...\", weight = 1.0}}, got {src!r}")
        weight = src.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"data.sources[{i}].weight must be a finite number >= 0, got {weight!r}")
    if d.sources and sum(src.get("weight", 1.0) for src in d.sources) <= 0:
        raise ConfigError("data.sources weights sum to zero")
    if d.bert_pairs != "none" and not (cfg.model.arch == "bert" and cfg.model.nsp_head):
        raise ConfigError(f'data.bert_pairs = "{d.bert_pairs}" needs model.arch = "bert" and model.nsp_head = true')
    _documents(cfg)
    _downstream(cfg)


def _downstream(cfg: Config) -> None:
    e = cfg.eval
    if not isinstance(e.tasks, list) or not all(isinstance(t, str) and t for t in e.tasks):
        raise ConfigError(f"eval.tasks must be a list of task file paths, got {e.tasks!r}")
    if e.downstream_interval < 0:
        raise ConfigError(f"eval.downstream_interval must be >= 0, got {e.downstream_interval}")
    if not e.tasks:
        return
    if cfg.model.arch != "gpt":
        raise ConfigError("eval.tasks scores continuations with a causal model: it needs model.arch = \"gpt\"")
    if cfg.data.source == "synthetic" and not cfg.data.tokenizer:
        raise ConfigError("eval.tasks needs a tokenizer to encode the tasks: data.source = \"synthetic\" has none; "
                          "set data.tokenizer or train on prepared data")


def _documents(cfg: Config) -> None:
    d = cfg.data
    for key in ("reset_positions", "mask_document_boundary"):
        if getattr(d, key) and not d.document_mask:
            raise ConfigError(f"data.{key} = true needs data.document_mask = true (the documents' boundaries)")
    if d.synthetic_doc_len < 0:
        raise ConfigError(f"data.synthetic_doc_len must be >= 0, got {d.synthetic_doc_len}")
    if not d.document_mask:
        return
    if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule == "zbv":
        raise ConfigError('data.document_mask = true with parallel.pp_schedule = "zbv" is not supported yet (its '
                          "deferred weight gradients lose track of the stage's parameters when the document ids "
                          'travel along); use "1f1b", "gpipe" or "interleaved_1f1b"')



def _outputs_apart(cfg: Config) -> None:
    """Nothing the run writes may lie in, contain or be its data; HF copies stay out of the checkpoint dir."""
    d, c = cfg.data, cfg.checkpoint
    data_paths = [d.path] if d.path else [src["path"] for src in d.sources]
    for key, where in (("logging.run_dir", Path(cfg.logging.run_dir)), ("checkpoint.dir", cfg.checkpoint_dir),
                       ("checkpoint.hf_dir", cfg.hf_dir)):
        for data in data_paths + ([d.tokenizer] if d.tokenizer else []):
            relation = _relation(where, Path(data))
            if relation:
                raise ConfigError(f"{key} {where} {relation} the data {data}: checkpoints and metrics would be "
                                  "written into it; choose a run dir outside the data")
    if (c.hf_interval or c.hf_at_end) and _relation(cfg.hf_dir, cfg.checkpoint_dir):
        raise ConfigError(f"checkpoint.hf_dir {cfg.hf_dir} {_relation(cfg.hf_dir, cfg.checkpoint_dir)} the "
                          f"checkpoint dir {cfg.checkpoint_dir}: keep the Hugging Face copies apart")


RULES = (_finite, _ranges, _choices, _kernels, _mixed_precision, _heads, _latent_attention, _multi_token,
         _llama_features, _positions, _experts, _drills, _optimizer, _deepspeed, _zero_stage, _data, _outputs_apart)


def _relation(path: Path, other: Path) -> str:
    """How ``path`` sits against ``other``: "is", "contains", "lies inside", or "" (apart)."""
    a, b = path.resolve(), other.resolve()
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return ""


def profile_range(text: str) -> tuple[int, int] | None:
    """``logging.profile_steps``: "5-7" -> (5, 7), "5" -> (5, 5), "" -> None."""
    if not text:
        return None
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    span = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not 1 <= span[0] <= span[1]:
        raise ConfigError(f'logging.profile_steps must be "A-B" or "A" with 1 <= A <= B, got {text!r}')
    return span


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field type; ints are accepted where floats are expected."""
    # annotations are strings here (``from __future__ import annotations``)
    kind = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}.get(str(annotation))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # --set logging.profile_steps=5 reads 5 as a TOML integer
    if kind is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key} expects {kind.__name__}, got {type(value).__name__} {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section [{section}]{_suggest(section, SECTIONS)} in {where}")
    target = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise ConfigError(f"unknown key {section}.{key}{_suggest(key, fields)} in {where}")
    setattr(target, key, _coerce(f"{section}.{key}", value, fields[key].type))


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise ConfigError(f"override key {dotted!r} is not of the form section.key")
    section, key = dotted.split(".")
    raw = raw.strip()
    try:  # TOML literal: 3, 3e-4, true, "x", [1, 2], [{path = "a", weight = 1}]
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as runs/x or cosine
    return section, key, value


def apply_override(cfg: Config, text: str) -> None:
    """One ``section.key=value`` onto ``cfg`` in place (not validated)."""
    section, key, value = _parse_override(text)
    _apply(cfg, section, key, value, f"--set {text}")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults < TOML file < overrides, validated. Raises ConfigError with one clear line."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"top-level key {section!r} in {path} must be a [section]{_suggest(section, SECTIONS)}")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for text in overrides:
        apply_override(cfg, text)
    return cfg.validate()


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config saved with ``to_dict`` / ``to_toml`` (checkpoints, run dirs)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "saved config")
    return cfg.validate()


def config_from_toml(text: str) -> Config:
    return config_from_dict(tomllib.loads(text))
