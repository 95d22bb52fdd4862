"""``ParallelDims``: the parallel degrees, checked before any process group exists, and their ``Meshes``.

Mesh dimensions, outermost first (torchtitan's order): ``pp``, ``dp_replicate``, ``dp_shard``, ``cp``, ``tp``.
``dp = dp_replicate × dp_shard`` is also available flattened as ``Meshes.dp``: the ranks that see different
data. Ranks that differ only in ``tp``, ``cp`` or ``pp`` see the same samples; ``cp`` peers each keep their own
chunks of every sequence (``parallel/context_parallel.py``), so gradients are averaged over ``dp × cp``
(``Meshes.grad``) and FSDP shards over ``dp_shard × cp`` (torchtitan's ``dp_shard_cp``, ``Meshes.fsdp``).

Expert parallelism takes its ``ep`` ranks from ``dp_shard × cp`` (torchtitan's rule): with ``ep > 1`` the mesh
splits ``dp_shard`` into ``dp_shard_mod_ep`` (outer) × ``dp_shard_in_ep`` (inner, ep / cp ranks) and flattens
``dp_shard_in_ep × cp`` as ``ep``: the tokens of a cp group's chunks and of ep / cp data-parallel ranks meet in
one all-to-all. Experts are split over ``ep`` and FSDP-sharded over ``dp_shard_mod_ep`` (× ``dp_replicate``);
everything else is sharded over the whole ``dp`` (× ``cp``) as without experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pretrain.config import Config, ConfigError

MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zbv")


def fsdp_sharded(cfg: Config, dims: ParallelDims) -> bool:
    """Whether FSDP shards the parameters: ZeRO-2/3 with more than one rank over dp × cp."""
    return cfg.parallel.zero_stage >= 2 and dims.dp * dims.cp > 1


def vocab_parallel(model_cfg) -> bool:
    """Whether TP splits the embedding and head over the vocabulary (and sequence parallelism applies): a GPT
    with an untied head."""
    return model_cfg.arch == "gpt" and not model_cfg.tie_embeddings


def stages_per_rank(cfg: Config) -> int:
    """Pipeline stages each rank holds: ``parallel.stages_per_rank`` for the interleaved schedules, else 1."""
    return cfg.parallel.stages_per_rank if cfg.parallel.pp_schedule in MULTI_STAGE_SCHEDULES else 1


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int = 1
    ep: int = 1  # inside dp_shard, not a factor of the world size

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        """dp_replicate 1 × dp_shard 4 × tp 2 × pp 1 (× cp 2) (ep 2 inside)."""
        extra = (f" × cp {self.cp}" if self.cp > 1 else "") + (f" (ep {self.ep} inside)" if self.ep > 1 else "")
        return f"dp_replicate {self.dp_replicate} × dp_shard {self.dp_shard} × tp {self.tp} × pp {self.pp}{extra}"

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> ParallelDims:
        """Resolve ``dp_shard = -1`` and check what depends on the world size or the layout's shape, with one line
        each. ``cfg`` is validated (``load_config`` does it): the rules that need no world size are its own."""
        p, m = cfg.parallel, cfg.model
        fixed = p.dp_replicate * p.tp * p.pp * p.cp
        if p.dp_shard == -1:
            if world_size % fixed:
                what = "dp_replicate × tp × pp" + (" × cp" if p.cp > 1 else "")
                sizes = f"{p.dp_replicate} × {p.tp} × {p.pp}" + (f" × {p.cp}" if p.cp > 1 else "")
                raise ConfigError(f"world size {world_size} is not divisible by {what} = {sizes} = {fixed}")
            dp_shard = world_size // fixed
        else:
            dp_shard = p.dp_shard
        dims = cls(p.dp_replicate, dp_shard, p.tp, p.pp, cp=p.cp, ep=p.ep)
        if dims.world_size != world_size:
            raise ConfigError(f"dp_replicate × dp_shard × cp × tp × pp = {p.dp_replicate} × {dp_shard} × {p.cp} × "
                              f"{p.tp} × {p.pp} = {dims.world_size}, but the world size is {world_size}")
        if m.n_heads % p.tp or m.kv_heads % p.tp:
            raise ConfigError(f"parallel.tp = {p.tp} must divide model.n_heads ({m.n_heads}) and the kv heads "
                              f"({m.kv_heads})")
        if m.ffn_dim % p.tp:
            raise ConfigError(f"parallel.tp = {p.tp} must divide the ffn hidden size ({m.ffn_dim})")
        if p.tp > 1 and m.arch == "gpt" and not m.tie_embeddings and m.vocab_size % p.tp:
            raise ConfigError(f"parallel.tp = {p.tp} must divide model.vocab_size ({m.vocab_size}) for the "
                              f"vocab-parallel head: pad it to {-(-m.vocab_size // (p.tp * 64)) * p.tp * 64}")
        if p.sequence_parallel and p.tp > 1 and not (m.arch == "gpt" and not m.tie_embeddings):
            raise ConfigError("parallel.sequence_parallel needs a GPT with model.tie_embeddings = false; "
                              "set parallel.sequence_parallel = false")
        if p.pp > 1 and cfg.data.bert_pairs != "none":
            raise ConfigError("pipeline parallelism does not carry sentence-pair (NSP / SOP) labels: set "
                              'data.bert_pairs = "none"')
        per_rank = stages_per_rank(cfg)
        if p.pp > 1 and p.pp_schedule == "zbv" and per_rank != 2:
            raise ConfigError(f"parallel.pp_schedule = zbv places exactly 2 stages per rank (a V); "
                              f"parallel.stages_per_rank = {p.stages_per_rank}")
        if p.pp > 1 and m.n_layers < p.pp * per_rank:
            raise ConfigError(f"{p.pp * per_rank} pipeline stages (pp {p.pp} × {per_rank} per rank) need at least "
                              f"as many layers; model.n_layers = {m.n_layers}")
        if p.pp > 1:
            micro = p.n_microbatches or p.pp
            if micro < p.pp and p.pp_schedule != "gpipe":
                raise ConfigError(f"parallel.pp_schedule = {p.pp_schedule} needs parallel.n_microbatches >= pp "
                                  f"({p.pp}), got {micro}")
            if cfg.train.micro_batch_size % micro:
                raise ConfigError(f"train.micro_batch_size ({cfg.train.micro_batch_size}) must be divisible by "
                                  f"parallel.n_microbatches ({micro})")
        if p.ep > 1:
            if m.n_experts % p.ep:
                raise ConfigError(f"parallel.ep = {p.ep} must divide model.n_experts ({m.n_experts})")
            if p.cp > 1 and p.ep % p.cp:
                raise ConfigError(f"parallel.ep = {p.ep} takes its ranks from dp_shard × cp: with parallel.cp = "
                                  f"{p.cp} it must be a multiple of cp")
            if dp_shard % (p.ep // p.cp):
                what = f"ep / cp = {p.ep // p.cp} must divide it" if p.cp > 1 else "it must divide it"
                raise ConfigError(f"parallel.ep = {p.ep} takes its ranks from dp_shard ({dp_shard} here): {what}")
            if p.zero_stage < 2:
                raise ConfigError(f"parallel.ep = {p.ep} needs FSDP for the experts' gradients: set "
                                  f"parallel.zero_stage = 2 or 3 (got {p.zero_stage})")
        if p.cp > 1:
            _check_context_parallel(cfg)
        if p.engine == "native" and dims.dp * dims.cp > 1 and p.zero_stage < 2 and (p.tp > 1 or p.pp > 1):
            what = "tensor" if p.tp > 1 else "pipeline"
            raise ConfigError(f"{what} parallelism with data parallelism needs FSDP: set parallel.zero_stage = 2 or "
                              f"3 (got {p.zero_stage})")
        if p.engine == "native" and p.dp_replicate > 1 and p.zero_stage < 2 and dims.dp_shard > 1:
            raise ConfigError("parallel.dp_replicate > 1 with dp_shard > 1 is HSDP: set parallel.zero_stage = 2 or 3")
        return dims

    def build_mesh(self, device_type: str) -> Meshes:
        """The device meshes of this layout (call after the process group exists)."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep > 1:  # dp_shard = dp_shard_mod_ep × dp_shard_in_ep, ep = dp_shard_in_ep × cp
            inner = self.ep // self.cp
            shard, shard_sizes = ("dp_shard_mod_ep", "dp_shard_in_ep"), (self.dp_shard // inner, inner)
        else:
            shard, shard_sizes = ("dp_shard",), (self.dp_shard,)
        names = ("pp", "dp_replicate", *shard, "cp", "tp")
        sizes = (self.pp, self.dp_replicate, *shard_sizes, self.cp, self.tp)
        root = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        ep = expert_fsdp = None
        if self.ep > 1:
            root[shard]._flatten("dp_shard")
            ep = root[("dp_shard_in_ep", "cp")]._flatten("ep")
            expert_fsdp = root[("dp_replicate", "dp_shard_mod_ep")] if self.dp_replicate > 1 else \
                root["dp_shard_mod_ep"]
        dp = root[("dp_replicate", *shard)]._flatten("dp")
        if self.cp > 1:
            grad = root[("dp_replicate", *shard, "cp")]._flatten("dp_cp")
            shard_cp = root[(*shard, "cp")]._flatten("dp_shard_cp")
            fsdp = root[("dp_replicate", "dp_shard_cp")] if self.dp_replicate > 1 else shard_cp
        else:
            grad = dp
            fsdp = root[("dp_replicate", "dp_shard")] if self.dp_replicate > 1 else dp
        return Meshes(root, dp, grad, fsdp, root["tp"], root["pp"], root["cp"], ep, expert_fsdp)


@dataclass(frozen=True)
class Meshes:
    """The device meshes of one layout (``ParallelDims.build_mesh``), each a ``DeviceMesh``:

    - ``root``: every rank, dims (pp, dp_replicate, dp_shard (split in two under EP), cp, tp);
    - ``dp``: dp_replicate × dp_shard flattened, the ranks reading different samples;
    - ``grad``: the ranks whose gradients are averaged (holding different tokens): ``dp``, or ``dp × cp``;
    - ``fsdp``: what FSDP shards over (HSDP: dp_replicate × dp_shard), ``cp`` folded into the shards;
    - ``tp``, ``pp``, ``cp``: their own dims;
    - ``ep``: the ranks one MoE layer's experts are split over (and its tokens exchanged between), or None;
    - ``expert_fsdp``: what the experts' parameters are FSDP-sharded over (the dp ranks holding the same
      experts), or None.
    """

    root: Any
    dp: Any
    grad: Any
    fsdp: Any
    tp: Any
    pp: Any
    cp: Any
    ep: Any = None
    expert_fsdp: Any = None


def _check_context_parallel(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
    if m.arch != "gpt" or m.flavor != "llama":
        raise ConfigError(f"parallel.cp = {p.cp} splits causal sequences with RoPE positions: it needs the "
                          f"llama-flavour GPT, not {m.arch}/{m.flavor}")
    if m.seq_len % (2 * p.cp):
        raise ConfigError(f"model.seq_len ({m.seq_len}) must be divisible by 2 × parallel.cp = {2 * p.cp} "
                          "(each cp rank holds two chunks of the sequence)")
    if p.cp_impl == "alltoall" and (m.n_heads // p.tp) % p.cp:
        raise ConfigError(f'parallel.cp_impl = "alltoall" needs parallel.cp ({p.cp}) to divide the attention heads '
                          f"of a tp rank ({m.n_heads // p.tp}): use cp_impl = \"ring\" or another cp")
    if m.dropout:
        raise ConfigError(f"model.dropout = {m.dropout}: attention dropout is not implemented under context "
                          "parallelism; set model.dropout = 0")
    if m.n_experts and m.moe_balance != "bias":
        raise ConfigError(f'model.moe_balance = "{m.moe_balance}" with parallel.cp > 1: the aux loss would see only '
                          'a rank\'s chunks of each sequence; use moe_balance = "bias"')
