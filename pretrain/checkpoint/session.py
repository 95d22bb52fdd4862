"""What a training run does with its directories before the first step: claim them (lock, write probe, free
space, no foreign steps under ``resume = "never"``) and find the step to resume from (verified, same model, same
tokenizer). The trainer calls these two; the checkpoint manager does the reading and writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pretrain.checkpoint.manager import CheckpointError, CheckpointManager, saved_config_toml, verify
from pretrain.config import Config, ConfigError, config_from_toml
from pretrain.files import DirLock, LockError, check_writable

# what fixes parameter shapes (resolved values: ffn_hidden = 0 and its default width are the same model)
IMPORT_CONFIG = "train.toml"  # beside an HF import's step: the config to continue pretraining it with
SHAPE_KEYS = ("arch", "flavor", "n_layers", "d_model", "n_heads", "kv_heads", "head_size", "ffn_dim", "vocab_size",
              "tie_embeddings", "type_vocab_size", "nsp_head", "qk_norm", "qkv_bias", "n_experts", "expert_dim",
              "n_shared_experts", "moe_dense_layers")


def claim_dirs(cfg: Config, is_main: bool, world_size: int, device, n_params: int, say) -> list[DirLock]:
    """Rank 0 locks and probes the run and checkpoint dirs; every rank learns whether that worked, so a refusal
    ends all of them with one line (printed by rank 0) instead of leaving the others in a collective."""
    locks, error = [], ""
    if is_main:
        run, ckpt = Path(cfg.logging.run_dir), cfg.checkpoint_dir
        dirs = [(run, "run dir (logging.run_dir)", True)]
        hf_copies = cfg.checkpoint.hf_interval or cfg.checkpoint.hf_at_end
        if hf_copies:
            hf = cfg.hf_dir
            dirs.append((hf, "Hugging Face copy dir (checkpoint.hf_dir)",
                         not (run.resolve() == hf.resolve() or run.resolve() in hf.resolve().parents)))
        if cfg.checkpoint.interval or hf_copies:
            inside = run.resolve() == ckpt.resolve() or run.resolve() in ckpt.resolve().parents
            dirs.append((ckpt, "checkpoint dir (checkpoint.dir)", not inside))
        try:
            for directory, what, lock_it in dirs:
                check_writable(directory, what)
                if not lock_it:  # inside the run dir, whose lock covers it
                    continue
                lock = DirLock(directory, what)
                note = lock.acquire()
                locks.append(lock)
                if note:
                    say(note)
            _refuse_foreign_steps(cfg)
            _warn_free_space(cfg, n_params, say)
        except (LockError, CheckpointError) as exc:
            for lock in locks:
                lock.release()
            locks, error = [], str(exc)
    failed = torch.tensor(float(bool(error)))
    if world_size > 1:
        failed = failed.to(device)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item():
        raise LockError(error or "rank 0 could not claim the run's directories (its message says why)")
    return locks


def _refuse_foreign_steps(cfg: Config) -> None:
    """``resume = "never"`` starts a new run: it must not write into (and prune) another run's steps."""
    if cfg.checkpoint.resume != "never" or not cfg.checkpoint.interval:
        return
    steps = CheckpointManager(cfg.checkpoint_dir, clean=False).steps_on_disk()
    if steps:
        raise CheckpointError(f'checkpoint.resume = "never" but {cfg.checkpoint_dir} already holds {len(steps)} '
                              f"step(s) of another run (newest {steps[-1].name}): use another checkpoint.dir, or "
                              'checkpoint.resume = "auto" to continue that run')


def _warn_free_space(cfg: Config, n_params: int, say) -> None:
    """A checkpoint holds the fp32 weights and two fp32 moments: 12 bytes a parameter. Warn when short."""
    if not cfg.checkpoint.interval:
        return
    need, free = 12 * n_params, shutil.disk_usage(cfg.checkpoint_dir).free
    if free < need:
        say(f"warning: {cfg.checkpoint_dir} has {free / 2 ** 30:.2f} GiB free, one checkpoint needs about "
            f"{need / 2 ** 30:.2f} GiB")


def resume_step(cfg: Config, manager: CheckpointManager, data_tokenizer_hash: str | None, say) -> Path | None:
    """The step this run continues from, verified before anything in it is read (all ranks call this together),
    or None to start fresh. ``auto``: the newest step that verifies; a named step: that one, no fallback."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        path = manager.newest_verified(say, distributed_hash=True)
    else:
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume = {resume}: no such step directory")
        named = CheckpointManager(path, clean=False)
        if not (path / "manifest.json").is_file() and named.steps_on_disk():  # a checkpoint dir: its newest
            path = named.newest_verified(say, distributed_hash=True)
        else:
            verify(path, distributed_hash=True)
    if path is None:
        return None
    try:
        imported = json.loads((path / "state.json").read_text()).get("model_only", False)
        check_resumable(saved_config_toml(path), cfg, path if imported else path.parent, imported)
    except ConfigError as exc:
        raise CheckpointError(f"{path / 'config.toml'}: {exc}") from None
    _check_same_tokenizer(path, data_tokenizer_hash, cfg)
    return path


def check_resumable(saved_toml: str, cfg: Config, where: Path, imported: bool = False) -> None:
    """The run's model has the shape of the checkpoint's. ``imported``: ``where`` is a model-only step (an HF
    import), whose own training config sits beside it."""
    saved = config_from_toml(saved_toml).model
    keys = SHAPE_KEYS + (("positions",) if cfg.model.learned_positions else ())
    for key in keys:
        old, new = getattr(saved, key), getattr(cfg.model, key)
        if old != new and imported:
            raise CheckpointError(
                f"{where} holds an imported model with model.{key} = {old!r}, this config has {new!r}: continue "
                f"with the config the import wrote, python -m pretrain.train --config {where.parent / IMPORT_CONFIG} "
                "--set data.path=DATA")
        if old != new:
            raise CheckpointError(
                f"{where} holds checkpoints of a different model (model.{key} = {old!r} there, {new!r} here); "
                "use another checkpoint.dir / logging.run_dir, or set checkpoint.resume = \"never\""
            )
    if imported:
        return  # a model-only import carries no optimizer state: any optimizer starts from it
    saved_optim = config_from_toml(saved_toml).optim.name
    if saved_optim != cfg.optim.name:
        raise CheckpointError(
            f"{where} holds checkpoints trained with optim.name = {saved_optim!r}, this config has "
            f"{cfg.optim.name!r}: the optimizer state does not carry over (AdamW's two moments, Muon's momentum); "
            "keep the optimizer, or start another checkpoint.dir / logging.run_dir")


def _check_same_tokenizer(path: Path, here: str | None, cfg: Config) -> None:
    """Token ids mean nothing under another tokenizer: a checkpoint continues only on data prepared with the
    tokenizer it was trained on (recorded in state.json)."""
    from pretrain.data.manifest import short

    saved = json.loads((path / "state.json").read_text()).get("tokenizer_hash")
    if saved and here and saved != here:
        data = cfg.data.path or ", ".join(src["path"] for src in cfg.data.sources)
        raise CheckpointError(f"{path} was trained on data tokenized with {short(saved)}, but {data} was prepared "
                              f"with {short(here)}: use data prepared with that tokenizer, or another checkpoint.dir")
