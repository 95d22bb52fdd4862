"""``parallelize``: build the model for this rank and apply FP8 -> TP -> EP -> CP -> activation checkpointing ->
compile -> FSDP, in that order (torchtitan's), then materialise it.

With ``parallel.meta_init`` (the default) the model is built on the meta device, sharded, then each rank
allocates and initialises only its own shards, so a 7B model never exists whole on one rank; replicated
layouts (one process, DDP, ZeRO-1) then hold the same initial values, sharded ones (TP, FSDP) values drawn per
shard. With ``meta_init = false`` every rank builds the whole model from the same seed and its shards are cut
from it: every layout then starts from exactly the same values (what the equivalence tests use; Megatron's
``use_cpu_initialization``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pretrain.config import Config, ConfigError
from pretrain.models import build_model
from pretrain.parallel.dims import Meshes, ParallelDims, fsdp_sharded


@dataclass
class Parallelized:
    """What the trainer drives: ``model`` runs forward/backward (DDP-wrapped when so), ``module`` is the plain
    (possibly sharded) module for the optimizer, state dicts and evaluation. With pipeline parallelism ``model``
    is None: this rank's ``stages`` (over its modules ``parts``) run forward and backward under the schedule the
    pipeline engine builds around them with its own loss function."""

    model: nn.Module
    module: nn.Module
    dims: ParallelDims
    mesh: Meshes | None = None
    dp_rank: int = 0
    stages: list = field(default_factory=list)  # torch.distributed.pipelining stages of this rank
    has_first_stage: bool = True
    has_last_stage: bool = True
    parts: list = field(default_factory=list)
    tied: object = None  # pipeline.TiedEmbeddings when a tied embedding spans the first and last stage
    context: object = None  # context_parallel.ContextParallel: how this rank cuts each sequence

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: those reading different samples."""
        return self.dims.dp

    def dp_group(self):
        return None if self.mesh is None or self.dims.dp == 1 else self.mesh.dp.get_group()

    @property
    def grad_ranks(self) -> int:
        """Ranks holding different tokens, whose gradients are averaged: dp × cp."""
        return self.dims.dp * self.dims.cp

    def grad_group(self):
        return None if self.mesh is None or self.grad_ranks == 1 else self.mesh.grad.get_group()

    @property
    def grad_rank(self) -> int:
        return 0 if self.mesh is None or self.grad_ranks == 1 else self.mesh.grad.get_local_rank()

    def split_batch(self, batch: dict) -> dict:
        """This rank's share of a micro-batch's sequences under context parallelism (as is otherwise). The
        document ids stay whole: attention reads the documents of other ranks' chunks too; so does a copy of the
        targets, ``mtp_targets``, which multi-token prediction shifts across the chunks (``GPT.mtp_losses``)."""
        if self.context is None:
            return batch
        from pretrain.parallel.context_parallel import split_sequence

        whole = {"mtp_targets": batch["targets"]} if "targets" in batch else {}
        return {**{k: split_sequence(v, self.context.cp, self.context.rank) if v.dim() >= 2 and k != "document_ids"
                   else v for k, v in batch.items()}, **whole}

    def pp_group(self):
        return None if self.mesh is None or self.dims.pp == 1 else self.mesh.pp.get_group()


def single(model: nn.Module) -> Parallelized:
    return Parallelized(model, model, ParallelDims(1, 1, 1, 1))


def parallelize(cfg: Config, dims: ParallelDims, mesh: Meshes | None, device: torch.device) -> Parallelized:
    if mesh is None:  # one process
        model = _build(cfg)
        _convert_fp8(model, cfg, dims, mesh, device)
        _apply_local(model, cfg)
        _materialise(model, device)
        return single(model)
    dp_rank = mesh.dp.get_local_rank()
    if cfg.parallel.engine == "deepspeed":  # the engine (made by the trainer with its optimizer) does the rest
        model = _build(cfg)  # the same initial values as one process with the same meta_init
        _apply_local(model, cfg)
        _materialise(model, device)
        return Parallelized(model, model, dims, mesh, dp_rank, parts=[model])
    if dims.pp > 1:
        parallel = _parallelize_pipeline(cfg, dims, mesh, device, dp_rank)
    else:
        model, runner = _shard(_build(cfg), cfg, dims, mesh, device)
        parallel = Parallelized(runner, model, dims, mesh, dp_rank, parts=[model])
    if dims.cp > 1:
        from pretrain.parallel.context_parallel import ContextParallel

        parallel.context = ContextParallel(mesh.cp.get_group(), dims.cp, mesh.cp.get_local_rank(),
                                           cfg.parallel.cp_impl)
    return parallel


def _build(cfg: Config) -> nn.Module:
    if cfg.parallel.meta_init:
        with torch.device("meta"):
            return build_model(cfg.model)
    return build_model(cfg.model)  # every rank builds the same seeded model; sharding cuts its part out


def _shard(model: nn.Module, cfg: Config, dims: ParallelDims, mesh, device) -> tuple[nn.Module, nn.Module]:
    """FP8 -> TP -> EP -> CP -> AC -> compile -> FSDP, materialise, DDP: returns (module, what runs forward/backward)."""
    p = cfg.parallel
    _convert_fp8(model, cfg, dims, mesh, device)  # swaps modules: before TP, whose hooks sit on them
    if dims.tp > 1:
        from pretrain.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh.tp, p.sequence_parallel)
    if dims.ep > 1:
        from pretrain.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, mesh.ep)
    if dims.cp > 1:
        from pretrain.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh.cp, p.cp_impl)
    _apply_local(model, cfg)
    sharded = fsdp_sharded(cfg, dims)
    if sharded:
        from pretrain.parallel.data_parallel import apply_fsdp
        from pretrain.parallel.mixed_precision import bf16_weights

        apply_fsdp(model, mesh.fsdp, reshard_after_forward=p.zero_stage == 3, bf16=bf16_weights(cfg, sharded=True),
                   cpu_offload=p.cpu_offload, expert_mesh=mesh.expert_fsdp)
    _materialise(model, device)
    runner = model
    if not sharded and dims.dp * dims.cp > 1:
        from pretrain.parallel.data_parallel import apply_ddp

        runner = apply_ddp(model, mesh.grad, device)
    return model, runner


def _parallelize_pipeline(cfg: Config, dims: ParallelDims, mesh, device, dp_rank: int) -> Parallelized:
    from pretrain.parallel.dims import stages_per_rank
    from pretrain.parallel.pipeline import (
        TiedEmbeddings,
        has_mtp,
        make_stage,
        prune_to_stage,
        shares_embedding,
        stage_ids,
    )

    per_rank = stages_per_rank(cfg)
    n_stages = dims.pp * per_rank
    ids = stage_ids(mesh.pp.get_local_rank(), dims.pp, per_rank, cfg.parallel.pp_schedule)
    parts, stages = [], []
    for sid in ids:
        torch.manual_seed(cfg.train.seed)  # every stage is cut from the same whole model
        model, runner = _shard(prune_to_stage(_build(cfg), sid, n_stages), cfg, dims, mesh, device)
        parts.append(model)
        if cfg.data.document_mask or has_mtp(cfg.model):  # document ids, positions, MTP targets travel along
            from pretrain.parallel.pipeline import DocumentStage

            runner = DocumentStage(runner, model)
        stages.append(make_stage(runner, sid, n_stages, device, mesh.pp.get_group()))
    tied = None
    if shares_embedding(cfg.model):
        tied = TiedEmbeddings(mesh.root, dict(zip(ids, parts)), n_stages, dims.pp, per_rank, cfg.parallel.pp_schedule)
        tied.sync_weights()  # a meta-device init drew the two copies separately
    module = parts[0] if len(parts) == 1 else nn.ModuleList(parts)
    return Parallelized(None, module, dims, mesh, dp_rank, stages=stages, has_first_stage=0 in ids,
                        has_last_stage=n_stages - 1 in ids, parts=parts, tied=tied)


def _convert_fp8(model: nn.Module, cfg: Config, dims: ParallelDims, mesh, device: torch.device) -> None:
    if cfg.train.fp8 == "none":
        return
    import torch.distributed as dist

    from pretrain.parallel.fp8 import all_gather_in_fp8, apply_fp8, converts_nothing

    fsdp = mesh is not None and fsdp_sharded(cfg, dims)
    backend = dist.get_backend() if dist.is_initialized() else "none"
    why = converts_nothing(cfg, apply_fp8(model, cfg, device, all_gather=all_gather_in_fp8(cfg, backend, fsdp)))
    if why:
        raise ConfigError(why)


def _apply_local(model: nn.Module, cfg: Config) -> None:
    from pretrain.parallel.checkpointing import apply_activation_checkpointing, apply_compile

    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing,
                                   cfg.parallel.activation_checkpointing_every)
    if cfg.train.compile:
        apply_compile(model)


def _materialise(model: nn.Module, device: torch.device) -> None:
    """Allocate this rank's shards on the device; after a meta build, initialise them in place."""
    if any(t.is_meta for t in model.parameters()):
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()  # also recomputes the rotary tables, which no state dict holds
    else:
        model.to(device)
