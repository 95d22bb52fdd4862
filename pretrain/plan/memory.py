"""Per-rank memory of a layout, before any process exists: parameters, gradients, optimizer state, activations,
logits and communication buffers, in bytes, each for the rank that holds the most of it (pipeline stages differ;
their sum bounds the fullest rank from above).

Parameters, gradients and optimizer state are exact: the model is built on the meta device from the config (the
real model code, so every shape is the trainer's), cut to each pipeline stage the way the trainer cuts it, and
each tensor's largest local piece follows the trainer's own sharding — TP's plan (``block_plan``: column-parallel
weights split on dim 0, row-parallel on dim 1, the vocab-parallel embedding and head), EP's expert split, FSDP's
dim-0 chunks over dp_shard × cp (experts over dp_shard / ep, on dim 1 when there are fewer local experts than
ranks) — every split a ``torch.chunk`` (ceil) so rank 0 of each group holds the largest piece of every tensor.
Gradients mirror the trainable parameters (fp32, sharded as they are). Optimizer state per parameter: AdamW two
fp32 moments + a 4-byte step (torch and Triton AdamW), Muon one momentum for the hidden matrices; ZeRO-1 gives
each rank the parameters torch's ZeroRedundancyOptimizer assigns it (largest first, to the least-loaded rank).

Activations are the tensors autograd keeps between a micro-batch's forward and its backward, per layer, from the
layer's own operations (see ``layer_activation_bytes``), times the micro-batches a pipeline schedule keeps in
flight; logits (and the loss's fp32 copy) on the last stage; communication buffers: DDP's gradient buckets, FSDP's
gathered unit (the largest block, twice with prefetch); bf16 weight copies (one process and DDP in bf16: 2 B a
matmul weight during the step, ``parallel/mixed_precision.py``) in ``detail["weight_copies_bytes"]``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pretrain.config import Config
from pretrain.parallel.dims import ParallelDims, fsdp_sharded, stages_per_rank, vocab_parallel


def _chunk(n: int, parts: int) -> int:
    """The largest piece of ``n`` cut by torch.chunk into ``parts``."""
    return -(-n // parts) if parts > 1 else n


@dataclass
class Memory:
    params_bytes: int = 0
    grads_bytes: int = 0
    optimizer_bytes: int = 0
    activations_bytes: int = 0
    logits_bytes: int = 0
    comm_bytes: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes +
                self.logits_bytes + self.comm_bytes + self.detail.get("recompute_bytes", 0) +
                self.detail.get("weight_copies_bytes", 0))

    def as_dict(self) -> dict:
        return {"params_bytes": self.params_bytes, "grads_bytes": self.grads_bytes,
                "optimizer_bytes": self.optimizer_bytes, "activations_bytes": self.activations_bytes,
                "logits_bytes": self.logits_bytes, "comm_bytes": self.comm_bytes, "total_bytes": self.total_bytes,
                **({"detail": self.detail} if self.detail else {})}


_SPLITS: dict = {}


def _tp_splits_cached(cfg: Config, sequence_parallel: bool) -> dict[str, int]:
    key = (repr(cfg.model), sequence_parallel)
    if key not in _SPLITS:
        if len(_SPLITS) > 64:
            _SPLITS.clear()
        _SPLITS[key] = _tp_splits(cfg, sequence_parallel)
    return _SPLITS[key]


def _tp_splits(cfg: Config, sequence_parallel: bool) -> dict[str, int]:
    """Parameter name -> the dim TP splits (absent: replicated), from the trainer's TP plan."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from pretrain.parallel.tensor_parallel import block_plan

    m = cfg.model
    gpt = m.arch == "gpt"
    splits: dict[str, int] = {}
    if vocab_parallel(m):
        splits["embed_tokens.weight"] = 0  # vocab-parallel embedding (RowwiseParallel on an Embedding)
        splits["lm_head.weight"] = 0
    gated = gpt and m.flavor == "llama"
    sp = sequence_parallel and vocab_parallel(m)
    mla = ("q_b_proj" if m.q_lora_rank else "q_proj") if getattr(m, "mla", False) else ""
    blocks = [(i, f"layers.{i}") for i in range(m.n_layers)]
    blocks += [(m.n_layers + j, f"mtp.{j}.block") for j in range(m.mtp_depth if gpt else 0)]  # MTP's blocks too
    for i, block in blocks:
        moe = bool(m.n_experts) and i >= m.moe_dense_layers
        plan = block_plan(m.arch, gated, sp, moe, moe and m.n_shared_experts > 0, mla=mla)
        for name, style in plan.items():
            prefix = f"{block}.{name}"
            if isinstance(style, ColwiseParallel):
                splits[f"{prefix}.weight"] = 0
                splits[f"{prefix}.bias"] = 0
            elif isinstance(style, RowwiseParallel):
                splits[f"{prefix}.weight"] = 1
    return splits


@contextlib.contextmanager
def _no_default_init():
    """nn.Linear / nn.Embedding skip their default initialisation while the planner builds meta models (there is
    nothing to fill on the meta device, and the random-init decompositions cost most of a 70B search)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def _stage_models(cfg: Config, dims: ParallelDims) -> list[list[nn.Module]]:
    """For each pp rank, its stage modules (meta device), cut as the trainer cuts them (``prune_to_stage``), from
    one build of the whole model: each stage is a shallow copy that shares its parameters."""
    from pretrain.models import build_model
    from pretrain.parallel.pipeline import prune_to_stage, stage_ids

    key = repr(cfg.model)
    if key not in _WHOLE:
        _WHOLE.clear()  # one model at a time (a search is of one model)
        with torch.device("meta"), _no_default_init():
            _WHOLE[key] = build_model(cfg.model)
    whole = _WHOLE[key]
    if dims.pp == 1:
        return [[whole]]
    per_rank = stages_per_rank(cfg)
    n_stages = dims.pp * per_rank
    return [[prune_to_stage(_shallow_copy(whole), sid, n_stages)
             for sid in stage_ids(r, dims.pp, per_rank, cfg.parallel.pp_schedule)] for r in range(dims.pp)]


_WHOLE: dict = {}


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose own module table and ``layers`` can be pruned; everything below is shared."""
    copy_ = copy.copy(model)
    object.__setattr__(copy_, "_modules", dict(model._modules))
    copy_._modules["layers"] = nn.ModuleDict(dict(model.layers.items()))
    return copy_


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _local_shape(cfg: Config, dims: ParallelDims, name: str, shape: tuple, splits: dict) -> tuple:
    """The largest piece of a parameter on any rank."""
    shape = list(shape)
    if dims.tp > 1 and name in splits:
        d = splits[name]
        shape[d] = _chunk(shape[d], dims.tp)
    if _is_expert(name) and dims.ep > 1:
        shape[0] = _chunk(shape[0], dims.ep)
    if fsdp_sharded(cfg, dims) and shape:
        if _is_expert(name) and dims.ep > 1:
            size = dims.dp_shard * dims.cp // dims.ep
            d = 0 if shape[0] % size == 0 else 1
            shape[d] = _chunk(shape[d], size)
        else:
            shape[0] = _chunk(shape[0], dims.dp_shard * dims.cp)
    return tuple(shape)


def _numel(shape) -> int:
    return math.prod(shape)


_STAGES: dict = {}


@dataclass
class _Part:
    """What the memory model reads of one stage module: its parameters (name, shape, trainable) and how the
    optimizer groups them (indices into ``params``; ``muon``: whether a group gets Muon's one moment)."""

    params: list[tuple[str, tuple, bool]]
    groups: list[tuple[list[int], bool]]
    copied: set[int] = field(default_factory=set)  # the matmul weights bf16 weight copies duplicate


def _describe_part(cfg: Config, part: nn.Module) -> _Part:
    from pretrain.optim import param_groups

    named = list(part.named_parameters())
    index = {id(t): i for i, (_, t) in enumerate(named)}
    o = cfg.optim
    if o.name == "muon":
        from pretrain.muon import muon_groups

        groups = [([index[id(t)] for t in g["params"]], bool(g["muon"])) for g in muon_groups(part, o.weight_decay)]
    else:
        groups = [([index[id(t)] for t in g["params"]], False) for g in param_groups(part, o.weight_decay)]
    from pretrain.parallel.mixed_precision import matmul_weights

    copied = {index[id(t)] for _, _, t in matmul_weights(part)}
    return _Part([(n, tuple(t.shape), t.requires_grad) for n, t in named], groups, copied)


def _stages_cached(cfg: Config, dims: ParallelDims) -> list[list[_Part]]:
    """``_stage_models`` described (``_Part``), memoised by model config, optimizer and pipeline cut (a search
    asks for the same ones hundreds of times)."""
    key = (repr(cfg.model), cfg.optim.name, cfg.optim.weight_decay, dims.pp, stages_per_rank(cfg),
           cfg.parallel.pp_schedule)
    if key not in _STAGES:
        if len(_STAGES) > 64:
            _STAGES.clear()
        _STAGES[key] = [[_describe_part(cfg, part) for part in parts] for parts in _stage_models(cfg, dims)]
    return _STAGES[key]


_STATE: dict = {}


def state_bytes(cfg: Config, dims: ParallelDims) -> dict:
    """Parameter, gradient and optimizer bytes, each of its largest rank (max over pipeline ranks), and the bytes of
    what communication holds there: DDP's gradient buckets, FSDP's gathered parameters (ZeRO-2 keeps a stage's
    between forward and backward; ZeRO-3 the largest block, twice with prefetch). Memoised on what it reads (a
    search asks again for every micro-batch size of a layout)."""
    key = (repr(cfg.model), repr(cfg.parallel), cfg.train.dtype, cfg.train.mixed_precision, cfg.train.fp8,
           cfg.optim.name, cfg.optim.weight_decay, repr(dims))
    if key not in _STATE:
        if len(_STATE) > 4096:
            _STATE.clear()
        _STATE[key] = _state_bytes(cfg, dims)
    return dict(_STATE[key])


def _state_bytes(cfg: Config, dims: ParallelDims) -> dict:
    p = cfg.parallel
    splits = _tp_splits_cached(cfg, p.sequence_parallel)
    fsdp = fsdp_sharded(cfg, dims)
    ddp = not fsdp and dims.dp * dims.cp > 1 and p.engine == "native"
    gathered_size = 2 if cfg.train.dtype == "bf16" else 4
    tp_only = ParallelDims(1, 1, dims.tp, dims.pp, ep=dims.ep)
    from pretrain.parallel.mixed_precision import bf16_weights

    # one process and DDP in bf16: a step's bf16 copies of the matmul weights (parallel/mixed_precision.py; their
    # gradient sums become the fp32 gradients, counted as such)
    copies_apply = not fsdp and bf16_weights(cfg, sharded=False)
    best = None
    for parts in _stages_cached(cfg, dims):
        params = grads = optim = copies = 0
        unsharded, largest_block = 0, 0
        for part in parts:
            local = [_local_shape(cfg, dims, n, shape, splits) for n, shape, _ in part.params]
            blocks: dict[str, int] = {}
            for i, ((n, shape, trainable), mine) in enumerate(zip(part.params, local)):
                size = _numel(mine) * 4  # fp32 master parameters
                params += size
                if copies_apply and i in part.copied:
                    copies += _numel(mine) * 2
                if trainable:
                    grads += _grad_bytes(cfg, dims, n, shape, size)
                gathered = _numel(_local_shape(cfg, tp_only, n, shape, splits)) * gathered_size
                unsharded += gathered
                if n.startswith("layers."):
                    block = ".".join(n.split(".")[:2])
                    blocks[block] = blocks.get(block, 0) + gathered
            largest_block = max([largest_block, *blocks.values()])
            optim += _optimizer_bytes(cfg, dims, part, local)
        comm = grads if ddp else (unsharded if p.zero_stage == 2 else 2 * largest_block) if fsdp else 0
        mine = (params, grads, optim, comm, copies)
        best = mine if best is None else tuple(max(a, b) for a, b in zip(best, mine))  # each on its largest rank
    return dict(zip(("params_bytes", "grads_bytes", "optimizer_bytes", "comm_bytes", "weight_copies_bytes"), best))


def _grad_bytes(cfg: Config, dims: ParallelDims, name: str, shape: tuple, size: int) -> int:
    """A gradient is its parameter's size, except the vocab-parallel embedding's under TP without FSDP: DTensor's
    embedding backward returns it replicated (whole on every TP rank; measured)."""
    if name == "embed_tokens.weight" and dims.tp > 1 and not fsdp_sharded(cfg, dims) and vocab_parallel(cfg.model):
        return _numel(shape) * 4
    return size


def _optimizer_bytes(cfg: Config, dims: ParallelDims, part: _Part, local: list[tuple]) -> int:
    adam = lambda i: 2 * _numel(local[i]) * 4 + 4  # exp_avg, exp_avg_sq, step (a float32 scalar)
    if cfg.optim.name == "muon":
        return sum(_numel(local[i]) * 4 if muon else adam(i) for members, muon in part.groups for i in members)
    if cfg.parallel.zero_stage == 1 and dims.dp * dims.cp > 1:  # ZeroRedundancyOptimizer's greedy partition
        ranks = dims.dp * dims.cp
        sizes, state = [0] * ranks, [0] * ranks
        for members, _ in part.groups:
            for i in sorted(members, key=lambda i: _numel(part.params[i][1]), reverse=True):
                r = sizes.index(min(sizes))
                sizes[r] += _numel(part.params[i][1])
                state[r] += adam(i)
        return max(state)
    return sum(adam(i) for members, _ in part.groups for i in members)


def _block_bytes(cfg: Config, dims: ParallelDims, tokens: int, moe: bool) -> float:
    """Bytes one block keeps for backward for ``tokens`` tokens of this rank (its sequence chunk under CP), from
    what our layers save: norms (llama RMSNorm: input, x·rsqrt, rsqrt; LayerNorm: input, mean, rstd; the output
    the next matmul saves), attention (q, k, v, output, log-sum-exp), the FFN (SwiGLU: gate, up, silu(gate),
    their product; GELU: input and output). Under TP heads and FFN are split; with SP the norms' own tensors
    are too (the matmuls keep their all-gathered input)."""
    m, p = cfg.model, cfg.parallel
    t, d, e, tp = tokens, m.d_model, m.head_size, dims.tp
    sp = p.sequence_parallel and tp > 1 and vocab_parallel(m)
    tn = t / tp if sp else t
    llama = m.arch == "gpt" and m.flavor == "llama"
    norm = 2 * tn * d + tn + t * d if llama else tn * d + 2 * tn + t * d
    heads, kv = m.n_heads / tp, m.kv_heads / tp
    attention = t * (heads + 2 * kv) * e + t * heads + t * heads * e
    if m.mla:  # q and k of the qk head dim, v and the output of the v head dim, the log-sum-exp; the kv latent
        # (projected, normed), the query bottleneck's (projected, normed), the concatenated q and k they make
        qk, v = m.qk_head_dim, m.v_head_dim
        attention = (t * heads * (2 * qk + 2 * v) + t * heads + 2 * t * (m.kv_lora_rank + m.qk_rope_head_dim)
                     + 2 * t * m.q_lora_rank + t * heads * 2 * qk)
    size = _act_size(cfg)
    extra = 0.0  # bytes outside the element count (index tensors)
    if moe:  # router scores / choices / weights, dispatch indices, permuted tokens, grouped GEMM in and out,
        # the weighted outputs, the shared experts, the balancing statistics (one block dumped, term by term)
        k, i, n_e = m.moe_top_k, m.expert_dim, m.n_experts
        seqs = t / (m.seq_len / dims.cp)
        ffn = (t * k * (3 * d + 4 * i + 1) + 4 * t * i * m.n_shared_experts / tp + 2 * t * n_e + 4 * t + k * t +
               seqs * n_e + n_e + 1)
        extra = 3 * t * k * 8
        if dims.ep > 1:  # the all-to-all's received and returned tokens
            ffn += 2 * t * k * d
    else:
        ffn = (4 if llama else 2) * t * m.ffn_dim / tp
    if dims.cp > 1:  # the ring's merged output and statistics (Ulysses: the re-split output)
        attention += t * heads * e + (3 if p.cp_impl == "ring" else 4) * t * heads
    elements = 2 * norm + attention + ffn
    if m.dropout:  # masks and the attention's materialised probabilities (approximate)
        elements += 3 * t * d + 2 * t * heads * m.seq_len / dims.cp
    return elements * size + extra


def _act_size(cfg: Config) -> int:
    return 2 if cfg.train.dtype == "bf16" else 4


def _in_flight(cfg: Config, dims: ParallelDims, rank: int, n_micro: int) -> list[int]:
    """Pipeline micro-batches whose activations pp rank ``rank`` holds at its peak, per local stage."""
    pp, schedule = dims.pp, cfg.parallel.pp_schedule
    if pp == 1:
        return [1]
    if schedule == "gpipe":
        return [n_micro]
    if schedule == "1f1b":
        return [min(n_micro, pp - rank)]
    v = stages_per_rank(cfg)
    if schedule == "interleaved_1f1b":  # torch's warm-up: (v − 1)·pp + 2·(pp − 1 − rank) forwards, then 1F1B;
        # the forwards go round the rank's stages pp micro-batches at a time
        chunks = min(n_micro * v, (v - 1) * pp + 2 * (pp - 1 - rank) + 1)
        legs, j = [0] * v, 0
        while chunks > 0 and any(c < n_micro for c in legs):
            take = min(pp, chunks, n_micro - legs[j % v])
            legs[j % v] += take
            chunks -= take
            j += 1
        return legs
    # zbv (deferred weight gradients keep their inputs; the counts are those measured at pp 2 and pp 4, within 5 %):
    # the V's first leg holds max(pp, 2·(pp − rank) − 1) micro-batches at the warm-up's peak, the second leg pp,
    # one fewer on rank 0, whose second leg is the last stage (its backward follows its forward)
    return [min(n_micro, max(pp, 2 * (pp - rank) - 1)), min(n_micro, pp - 1 if rank == 0 else pp)]


def activation_bytes(cfg: Config, dims: ParallelDims) -> tuple[int, int, int]:
    """(activations, logits, recompute) bytes of the pp rank with the most saved: tensors of the micro-batches
    in flight; the loss's logits on the last stage; one checkpointed block recomputed during its backward."""
    from pretrain.parallel.pipeline import layer_ranges, stage_ids

    m, p = cfg.model, cfg.parallel
    size = _act_size(cfg)
    per_rank = stages_per_rank(cfg) if dims.pp > 1 else 1
    n_stages = dims.pp * per_rank
    n_micro = (p.n_microbatches or p.pp) if dims.pp > 1 else 1
    seqs = cfg.train.micro_batch_size / n_micro
    s = m.seq_len // dims.cp
    t = seqs * s
    sp = p.sequence_parallel and dims.tp > 1 and vocab_parallel(m)
    tn = t / dims.tp if sp else t
    llama = m.arch == "gpt" and m.flavor == "llama"
    ranges = layer_ranges(m.n_layers, n_stages)
    best = (0, 0, 0)
    for rank in range(dims.pp):
        acts = logits = recompute = 0.0
        unwrapped = False
        for sid, flight in zip(stage_ids(rank, dims.pp, per_rank, p.pp_schedule), _in_flight(cfg, dims, rank,
                                                                                              n_micro)):
            stage = 0.0
            for layer in ranges[sid]:
                moe = bool(m.n_experts) and layer >= m.moe_dense_layers
                full = _block_bytes(cfg, dims, t, moe)
                wrapped = p.activation_checkpointing == "full" or (
                    p.activation_checkpointing == "selective" and layer % p.activation_checkpointing_every == 0)
                stage += tn * m.d_model * size if wrapped else full
                recompute = max(recompute, full if wrapped else 0)
                unwrapped |= not wrapped and flight > 0
            if sid == 0:  # token ids (+ positions, BERT's types, mask and embedding LayerNorm)
                stage += t * 8
                if llama:
                    pass
                elif m.arch == "gpt":
                    stage += s * 8
                else:
                    stage += t * 8 + s * 8 + (2 * t * m.d_model + 2 * t) * size + seqs * s * 4
            if sid == n_stages - 1:  # final norm / MLM head, logits, targets
                for j in range(m.mtp_depth):  # each MTP depth: its block, its inputs' norms and projection, logits
                    layer = m.n_layers + j
                    stage += _block_bytes(cfg, dims, t, bool(m.n_experts) and layer >= m.moe_dense_layers)
                    stage += 6 * t * m.d_model * size
                    logits += flight * (t * m.vocab_size * 4 + t * 8)
                if m.arch == "bert":
                    stage += (3 * t * m.d_model + 2 * t) * size
                else:
                    stage += ((2 * tn * m.d_model + tn + t * m.d_model) if llama else
                              (tn * m.d_model + 2 * tn + t * m.d_model)) * size
                vocab_split = dims.tp if vocab_parallel(m) else 1
                logits += flight * (t * m.vocab_size / vocab_split * 4 + t * 8 + 8)
            acts += flight * stage
        if llama and unwrapped:  # the rotary tables: one cached pair, saved by every block
            acts += 2 * s * m.rotary_dim * size
        if acts + logits > best[0] + best[1]:  # activations and logits of the same rank: they coexist
            best = (int(acts), int(logits), best[2])
        best = (best[0], best[1], max(best[2], int(recompute)))
    return best


def estimate_memory(cfg: Config, world_size: int) -> Memory:
    """The per-rank memory of ``cfg`` on ``world_size`` ranks (ConfigError for a layout the trainer refuses)."""
    dims = ParallelDims.from_config(cfg, world_size)
    state = state_bytes(cfg, dims)
    copies = state.pop("weight_copies_bytes")
    mem = Memory(**state)
    if copies:
        mem.detail["weight_copies_bytes"] = copies
    mem.activations_bytes, mem.logits_bytes, recompute = activation_bytes(cfg, dims)
    mem.detail["recompute_bytes"] = recompute
    return mem
