"""Entry point: ``python -m pretrain.train --config FILE [--set section.key=value ...]`` (also under torchrun, srun).

parse -> init distributed -> build model, data, trainer -> fit. Any configuration or data problem ends the run
with one line on stderr naming the cause, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from pretrain import distributed
from pretrain.config import Config, ConfigError, load_config
from pretrain.data import build_stream
from pretrain.errors import UserError
from pretrain.files import check_writable, disk_error
from pretrain.metrics import MetricsLogger
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import parallelize
from pretrain.tasks import task_for
from pretrain.trainer import PREEMPTED_EXIT, Trainer, TrainingError

USER_ERRORS = (UserError,)  # config, data, tokenizer, checkpoint, lock, missing extra: pretrain/errors.py


RANK_LOCAL_KEYS: frozenset[str] = frozenset()  # config keys ranks may set differently (none so far)


def check_ranks_agree(cfg: Config, dist: distributed.DistInfo) -> None:
    """Every rank trains the same config: gather each rank's resolved values and refuse, naming the keys, when
    they differ (a rank with another optim.lr would otherwise train on with diverging replicas, one with another
    train.steps or run dir hang at the first save). Each rank raises the same line; rank 0 prints it."""
    if dist.world_size == 1:
        return
    mine = {f"{section}.{key}": repr(value) for section, values in cfg.to_dict().items()
            for key, value in values.items() if f"{section}.{key}" not in RANK_LOCAL_KEYS}
    everyone: list = [None] * dist.world_size
    torch.distributed.all_gather_object(everyone, mine)
    differing = [key for key in mine if len({str(theirs.get(key)) for theirs in everyone}) > 1]
    if not differing:
        return
    key = differing[0]
    by_value: dict[str, list[int]] = {}
    for rank, theirs in enumerate(everyone):
        by_value.setdefault(str(theirs.get(key)), []).append(rank)
    shown = "; ".join(f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
                      for value, ranks in by_value.items())
    more = f" (and {', '.join(differing[1:4])}{', ...' if len(differing) > 4 else ''})" if len(differing) > 1 else ""
    raise ConfigError(f"the ranks were started with different configs: {key} = {shown}{more}; launch every rank "
                      "with the same --config and --set")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pretrain-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML preset (configs/*.toml); defaults apply when omitted")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 train.steps=100")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the parallel layout for the launched world size (WORLD_SIZE "
                             "or SLURM_NTASKS), print the layout and exit; the batch scripts run this before srun")
    return parser.parse_args(argv)


def build_trainer(cfg: Config, dist: distributed.DistInfo, dims: ParallelDims | None = None) -> Trainer:
    dims = dims or ParallelDims.from_config(cfg, dist.world_size)
    if cfg.checkpoint.hf_interval or cfg.checkpoint.hf_at_end:  # refused now, not at the first copy an hour in
        from pretrain.checkpoint.hf import family_of, require_transformers

        require_transformers("checkpoint.hf_interval / checkpoint.hf_at_end")
        family_of(cfg.model)
    torch.manual_seed(cfg.train.seed)
    mesh = dims.build_mesh(dist.device.type) if dist.world_size > 1 else None
    parallel = parallelize(cfg, dims, mesh, dist.device)
    pin = dist.device.type == "cuda"
    rank, world = parallel.dp_rank, parallel.dp_size  # tensor- and pipeline-parallel peers share samples
    train_data = build_stream(cfg, "train", rank, world, pin_memory=pin)
    val_factory = None
    if cfg.eval.interval:
        build_stream(cfg, "val", rank, world)  # fail now, not at the first eval
        val_factory = lambda: build_stream(cfg, "val", rank, world, pin_memory=pin)
    check_writable(cfg.logging.run_dir, "run dir (logging.run_dir)")  # every rank: before anything is written
    metrics = MetricsLogger(cfg.logging.run_dir, enabled=dist.is_main, tensorboard=cfg.logging.tensorboard,
                            wandb_project=cfg.logging.wandb_project, config=cfg.to_dict())
    from pretrain.downstream import Downstream

    downstream = Downstream.for_config(cfg)  # every task file read and encoded before step 1
    trainer = Trainer(cfg, parallel, task_for(cfg.model.arch, cfg.model), train_data, dist, val_factory, metrics)
    trainer.downstream = downstream
    return trainer


def _launched_rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# before a process group exists, how long a silent rank stays up after a user error: long enough for rank 0 (which
# says it at once) to exit first and the launcher to stop this rank; still alive after it, rank 0 never met it
SILENT_RANK_GRACE_S = 5.0


def _say_once(exc: Exception, said: bool) -> None:
    """Before training every rank meets the same user error and rank 0 alone says it. The launcher (torchrun, srun)
    stops the other ranks the moment one exits non-zero, so a silent rank that got there first would take rank
    0's line with it: it waits — on the group's store until rank 0 has printed (at most 10 s), or, before there
    is a group, ``SILENT_RANK_GRACE_S``. A silent rank still running after that met an error rank 0 did not
    (a rank-local cause) and says it itself."""
    if said:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    if not torch.distributed.is_initialized():
        if not said:
            time.sleep(SILENT_RANK_GRACE_S)
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return
    from datetime import timedelta

    from torch.distributed.distributed_c10d import _get_default_store

    key = "pretrain/user-error-said"
    try:
        if said:
            _get_default_store().set(key, "1")
        else:
            _get_default_store().wait([key], timedelta(seconds=10))
    except Exception:  # noqa: BLE001 - rank 0 never said it (a rank-local cause, or it is gone): say it here
        print(f"error: {exc}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    training = False  # before training, every rank meets the same user error: rank 0 alone says it
    try:
        cfg = load_config(args.config, overrides)
        world = distributed.launched_world_size()
        dims = ParallelDims.from_config(cfg, world)  # before any process group
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            for line in cfg.inert():
                print(f"note: {line}")
        if args.check:
            print(f"config ok: {args.config or 'defaults'}, {world} processes = {dims.describe()}, run dir "
                  f"{cfg.logging.run_dir}")
            from pretrain.plan.check import check

            line, error = check(cfg, world)
            if line:
                print(line)
            if error:
                raise ConfigError(error)
            return 0
        dist = distributed.init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
        check_ranks_agree(cfg, dist)
        trainer = build_trainer(cfg, dist, dims)
        try:
            training = True
            losses = trainer.fit()
        finally:
            trainer.metrics.close()
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C): stopped without saving", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        _say_once(exc, training or _launched_rank() == 0)
        return 2
    except OSError as exc:
        if disk_error(exc) is None:
            raise
        print(f"error: {disk_error(exc)}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if trainer.preempted:
        distributed.destroy()
        # Saved; the job is requeued and resumes from latest. A process on its own exits 75 for its launcher to
        # requeue on. One of many exits 0: torchrun restarts its workers after any non-zero exit (and reports 1,
        # not their code), and srun --kill-on-bad-exit kills the other ranks the moment one exits non-zero. The
        # batch scripts in slurm/ forwarded the signal themselves, so they requeue on 0.
        alone = dist.world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ
        return PREEMPTED_EXIT if alone else 0
    if dist.is_main and losses:
        print(f"done: {len(losses)} steps, final loss {losses[-1]:.4f}")
    distributed.destroy()
    return 0


def run() -> None:
    """The command line (``python -m pretrain.train``, ``pretrain-train``): ``main``, then leave at once. Once the
    work is done, saved and the process group destroyed, nothing is left to clean up, and running the C++
    destructors at interpreter exit has aborted a rank now and then ("terminate called without an active
    exception", from collective-library threads) — which srun --kill-on-bad-exit turns into a failed job instead
    of a requeue. Exceptions still propagate with their traceback and exit status."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
