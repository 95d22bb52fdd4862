"""The training loop, model-agnostic: accumulate, clip, step, schedule, evaluate, log, checkpoint.

The model-specific part is a task (``pretrain/tasks.py``) that turns one batch into a summed loss. Each step
fetches its ``grad_accum`` micro-batches first, counts their targets across all ranks, and back-propagates
``loss_sum / count``: the gradient of the mean over the whole global batch, whatever the accumulation or
data-parallel split.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pretrain import distributed
from pretrain.checkpoint.manager import CheckpointError, CheckpointManager, saved_config_toml, verify
from pretrain.config import Config, ConfigError, config_from_toml, profile_range
from pretrain.distributed import DistInfo
from pretrain.files import DirLock, LockError, check_writable
from pretrain.metrics import MetricsLogger, measure_matmul_flops, memory_stats, peak_flops
from pretrain.models.flops import flops_per_token
from pretrain.parallel.data_parallel import clip_grad_norm, no_gradient_sync
from pretrain.parallel.parallelize import Parallelized

# batch entries the loader adds for bookkeeping, not model inputs
META_KEYS = ("index", "skipped", "source")

# what fixes parameter shapes (resolved values: ffn_hidden = 0 and its default width are the same model)
SHAPE_KEYS = ("arch", "flavor", "n_layers", "d_model", "n_heads", "kv_heads", "ffn_dim", "vocab_size",
              "tie_embeddings", "type_vocab_size", "nsp_head")


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for update ``step`` (0-based): linear warmup, then cosine / linear / WSD / constant."""
    s, o, total = cfg.schedule, cfg.optim, cfg.train.steps
    if step < s.warmup_steps:
        return o.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return o.lr
    if s.decay == "wsd":  # warmup-stable-decay (Hu et al. 2024): flat, then linear to min_lr at the end
        decay_start = max(s.warmup_steps, int(total * (1 - s.decay_fraction)))
        if step < decay_start:
            return o.lr
        progress = (step - decay_start) / max(1, total - decay_start)
        return o.lr - (o.lr - o.min_lr) * min(1.0, progress)
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    if s.decay == "linear":
        return o.lr - (o.lr - o.min_lr) * progress
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matmul weights only: not on norms, biases or embeddings."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, other = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (other if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device, zero1_group=None) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA); with ``zero1_group`` its state is partitioned over those ranks (ZeRO-1)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    betas = (o.beta1, o.beta2)
    if o.impl == "triton":
        if zero1_group is not None:
            raise ConfigError('optim.impl = "triton" does not combine with parallel.zero_stage = 1; use "torch"')
        try:
            from kernels.adamw import FusedAdamW
        except (ImportError, RuntimeError) as exc:
            raise ConfigError(f'optim.impl = "triton" needs triton ({exc}): pip install \'pretrain[triton]\'') from None
        return FusedAdamW(groups, lr=o.lr, betas=betas, eps=o.eps)
    if o.impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ConfigError('optim.impl = "apex" needs NVIDIA apex, which is not installed (it is not on PyPI: '
                              'build it from github.com/NVIDIA/apex), or use "torch" / "triton"') from None
        return FusedAdam(groups, lr=o.lr, betas=betas, eps=o.eps, adam_w_mode=True)
    kwargs = {"lr": o.lr, "betas": betas, "eps": o.eps, "fused": device.type == "cuda"}
    if zero1_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                            process_group=zero1_group, weight_decay=o.weight_decay, **kwargs)
        optimizer.add_param_group({"params": groups[1]["params"], "weight_decay": 0.0})
        return optimizer
    return torch.optim.AdamW(groups, **kwargs)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message is one line for the user."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after saving; the launcher requeues and the run resumes


def _plain(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (a loss under loss_parallel) as an ordinary tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def check_resumable(saved_toml: str, cfg: Config, where: Path) -> None:
    saved = config_from_toml(saved_toml).model
    keys = SHAPE_KEYS + (("positions",) if cfg.model.learned_positions else ())
    for key in keys:
        old, new = getattr(saved, key), getattr(cfg.model, key)
        if old != new:
            raise CheckpointError(
                f"{where} holds checkpoints of a different model (model.{key} = {old!r} there, {new!r} here); "
                "use another checkpoint.dir / logging.run_dir, or set checkpoint.resume = \"never\""
            )


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    skipped: int = 0
    data_wait_s: float = 0.0  # of ``seconds``, waiting for the loader


class Trainer:
    """Drives a parallelized model (``pretrain/parallel/parallelize.py``): ``parallel.model`` runs forward and
    backward, ``parallel.module`` is what the optimizer, checkpoints and evaluation see. Losses and counts are
    reduced over the data-parallel ranks only: tensor- and pipeline-parallel ranks share their samples."""

    def __init__(self, cfg: Config, parallel: Parallelized, task, train_data, dist: DistInfo,
                 val_data_factory=None, metrics: MetricsLogger | None = None):
        self.cfg, self.task, self.data, self.dist = cfg, task, train_data, dist
        self.device = dist.device
        self.parallel = parallel
        self.model, self.raw_model = parallel.model, parallel.module
        self.dp_size, self.dp_group = parallel.dp_size, parallel.dp_group()
        native = cfg.parallel.engine == "native"
        zero1 = self.dp_group if native and cfg.parallel.zero_stage == 1 and self.dp_size > 1 else None
        self.optimizer = build_optimizer(self.raw_model, cfg, self.device, zero1)
        self.engine = None
        if not native:  # DeepSpeed runs forward, backward, clipping and the optimizer step
            from pretrain.parallel.deepspeed import initialize

            self.engine = initialize(cfg, self.raw_model, self.optimizer, self.dp_size)
            self.model, self.optimizer = self.engine, self.engine.optimizer
        self.val_data_factory = val_data_factory
        self.metrics = metrics or MetricsLogger(cfg.logging.run_dir, enabled=False)
        self.step = 0
        self.data_skipped = 0  # samples masked out as bad (data.on_bad_sample = "skip"), all ranks
        self.skipped_updates = 0  # steps whose update was skipped for a non-finite loss or gradient norm
        self.nonfinite_in_a_row = 0
        self.stop_requested = False  # set by SIGUSR1 / SIGTERM: save at the end of the step and stop
        self.preempted = False
        self.losses: list[float] = []
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak = peak_flops(self.device, cfg.logging.peak_tflops)
        if cfg.logging.measure_peak:
            self.peak = measure_matmul_flops(self.device, torch.bfloat16 if cfg.train.dtype == "bf16" and
                                             self.device.type == "cuda" else torch.float32)
            self.metrics.console(f"MFU peak: measured {self.peak / 1e12:.1f} TFLOP/s (dense matmul on "
                                 f"{self.device.type})")
        self.profile = profile_range(cfg.logging.profile_steps)
        self._profiler = None
        self.checkpoints = None
        if cfg.checkpoint.interval > 0 or cfg.checkpoint.resume != "never" and (
                cfg.checkpoint.resume != "auto" or cfg.checkpoint_dir.is_dir()):
            self.checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last, dist.rank,
                                                 cfg.checkpoint.keep_every, clean=False)

    # --- checkpoints --------------------------------------------------------------------------------------
    def maybe_resume(self) -> bool:
        resume = self.cfg.checkpoint.resume
        if self.checkpoints is None or resume == "never":
            return False
        if resume == "auto":  # the newest step that verifies, the others reported
            path = self.checkpoints.newest_verified(self.metrics.console, distributed_hash=True)
        else:  # a step named by the user: verified, no fallback
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.resume = {resume}: no such step directory")
            if not (path / "manifest.json").is_file() and CheckpointManager(path, clean=False).steps_on_disk():
                path = CheckpointManager(path, clean=False).newest_verified(self.metrics.console,
                                                                            distributed_hash=True)
            else:
                verify(path, distributed_hash=True)
        if path is None:
            return False
        try:
            saved_toml = saved_config_toml(path)
            check_resumable(saved_toml, self.cfg, path.parent)
        except ConfigError as exc:
            raise CheckpointError(f"{path / 'config.toml'}: {exc}") from None
        self._check_same_tokenizer(path)
        state = self.checkpoints.load(path, self.raw_model, self.optimizer, self.engine)
        if state.get("model_only"):  # weights to continue pretraining from (e.g. imported from Hugging Face)
            self.metrics.console(f"initialised the model from {path}")
            return True
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))
        self.data_skipped = int(state.get("data_skipped", 0))
        self.data.load_state_dict(state["data"])
        self.metrics.console(f"resumed from {path} at step {self.step}")
        return True

    def _check_same_tokenizer(self, path: Path) -> None:
        """Token ids mean nothing under another tokenizer: a checkpoint continues only on data prepared with the
        tokenizer it was trained on (recorded in state.json since checkpoints carry it)."""
        import json

        from pretrain.data.documents import short

        saved = json.loads((path / "state.json").read_text()).get("tokenizer_hash")
        here = getattr(self.data, "tokenizer_hash", None)
        if saved and here and saved != here:
            d = self.cfg.data
            data = d.path or ", ".join(src["path"] for src in d.sources)
            raise CheckpointError(f"{path} was trained on data tokenized with {short(saved)}, but {data} was "
                                  f"prepared with {short(here)}: use data prepared with that tokenizer, or another "
                                  "checkpoint.dir")

    def save(self) -> Path:
        state = {"data": self.data.state_dict(), "losses": self.losses, "data_skipped": self.data_skipped,
                 "tokenizer_hash": getattr(self.data, "tokenizer_hash", None)}
        return self.checkpoints.save(self.step, self.raw_model, self.optimizer, state, self.cfg.to_toml(), self.engine,
                                     async_save=self.cfg.checkpoint.async_save)

    def _loss_context(self):
        """``loss_parallel`` around forward and backward when the head's logits are sharded over the vocab."""
        m = self.cfg.model
        if self.parallel.dims.tp > 1 and m.arch == "gpt" and not m.tie_embeddings:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def _run_pipeline(self, batch: dict[str, torch.Tensor], scale, train: bool) -> dict[str, torch.Tensor]:
        """One trainer micro-batch through the pipeline schedule (split into its micro-batches); returns the
        summed loss, target count and correct guesses seen by this rank's last stage (zeros elsewhere)."""
        seen: dict[int, tuple] = {}

        def loss_fn(output, target):
            out = self.task.loss_from_output(output, target, accuracy=not train)
            result = out.loss_sum * scale
            seen[id(result)] = (result, out)
            return result

        self.parallel.pipeline_loss.fn = loss_fn
        inputs, target = self.task.pipeline_io(batch)
        args = inputs if self.parallel.has_first_stage else ()
        kwargs = {"target": target} if self.parallel.has_last_stage else {}
        losses: list = []
        with self._loss_context(), self._autocast():
            if train:
                self.parallel.schedule.step(*args, losses=losses, **kwargs)
            else:
                self.parallel.schedule.eval(*args, losses=losses, **kwargs)
        # only the micro-batches the schedule reports: its shape inference calls the loss function too
        totals = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ("loss", "count", "correct")}
        for loss in losses:
            out = seen[id(loss)][1]
            totals["loss"] += _plain(out.loss_sum.detach()).to(torch.float64)
            totals["count"] += out.count.to(torch.float64)
            totals["correct"] += out.correct.to(torch.float64)
        return totals

    def _pipeline_forward_backward(self, micro_batches, scale) -> torch.Tensor:
        for part in self.parallel.parts:
            part.train()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            loss_total += self._run_pipeline(batch, scale, train=True)["loss"]
        return distributed.all_reduce_sum(loss_total, self.parallel.pp_group())  # only the last stage has it

    def _deepspeed_step(self, micro_batches, scale, count, lr: float, start: float, skipped,
                        data_wait: float) -> StepResult:
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.engine.train()
        for batch in micro_batches:
            with self._autocast():
                out = self.task.loss(self.engine, batch, accuracy=False)
            # DeepSpeed divides the loss by the accumulation steps itself: undo it, the scale is already global
            self.engine.backward(out.loss_sum * scale * self.cfg.train.grad_accum)
            self.engine.step()  # steps the optimizer at the accumulation boundary only
            loss_total += out.loss_sum.detach().to(torch.float64)
        loss_total = self._dp_sum(loss_total)
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        tokens = sum(b["tokens"].numel() for b in micro_batches) * self.dp_size
        return StepResult(float(loss_total / count.clamp(min=1)), float(grad_norm or 0.0), lr, tokens,
                          time.perf_counter() - start, int(skipped), data_wait)

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (the ones holding different samples)."""
        return distributed.all_reduce_sum(value, self.dp_group) if self.dp_size > 1 else value

    # --- one step -----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> StepResult:
        start = time.perf_counter()
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loaded = [self.data.next_batch() for _ in range(cfg.train.grad_accum)]
        data_wait = time.perf_counter() - start
        skipped = sum(int(b["skipped"].sum()) for b in loaded if "skipped" in b)
        micro_batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items() if k not in META_KEYS}
                         for b in loaded]
        count = torch.stack([self.task.count(b) for b in micro_batches]).sum().to(torch.float64)
        count, skipped = self._dp_sum(
            torch.stack([count, torch.tensor(float(skipped), dtype=torch.float64, device=self.device)]))
        # DDP / FSDP average gradients over the dp ranks: scale by their number to keep the global mean
        scale = (self.dp_size / count.clamp(min=1)).float()
        if self.parallel.schedule is not None:
            loss_total = self._pipeline_forward_backward(micro_batches, scale)
        elif self.engine is not None:
            return self._deepspeed_step(micro_batches, scale, count, lr, start, skipped, data_wait)
        else:
            loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
            self.model.train()
            for i, batch in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with no_gradient_sync(self.model, active=not last and self.dp_size > 1), self._loss_context():
                    with self._autocast():
                        out = self.task.loss(self.model, batch, accuracy=False)
                    (out.loss_sum * scale).backward()
                loss_total += _plain(out.loss_sum.detach()).to(torch.float64)
        loss_total = self._dp_sum(loss_total)
        if self.step + 1 in cfg.train.inject_nan_steps:  # fault drill for the guard below and the launchers
            loss_total = loss_total * float("nan")
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        tied = self.parallel.tied
        if tied is not None:
            tied.sync_gradients()
        grad_norm = clip_grad_norm(list(self.raw_model.parameters()), max_norm, self.parallel.pp_group(),
                                   tied.not_counted() if tied is not None else ())
        loss = float(loss_total / count.clamp(min=1))
        # every rank sees the same reduced loss and norm, so all skip or none does
        if math.isfinite(loss) and math.isfinite(float(grad_norm)):
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.skipped_updates += 1
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise TrainingError(f"loss or gradient norm non-finite for {self.nonfinite_in_a_row} steps in a row "
                                    f"(up to step {self.step + 1}): lower optim.lr or check the data")
            self.metrics.console(f"step {self.step + 1}: non-finite loss ({loss}) or grad norm ({float(grad_norm)}); "
                                 "update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(b["tokens"].numel() for b in micro_batches) * self.dp_size
        return StepResult(loss, float(grad_norm), lr, tokens, time.perf_counter() - start, int(skipped), data_wait)

    # --- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        data = self.val_data_factory()
        for part in self.parallel.parts or [self.raw_model]:
            part.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.eval.steps):
            try:
                batch = {k: v.to(self.device) for k, v in data.next_batch().items() if k not in META_KEYS}
            except StopIteration:
                break
            if self.parallel.schedule is not None:
                got = self._run_pipeline(batch, 1.0, train=False)
                loss_sum += got["loss"]
                count += got["count"]
                correct += got["correct"]
                continue
            with self._autocast(), self._loss_context():
                out = self.task.loss(self.raw_model, batch, accuracy=True)
            loss_sum += _plain(out.loss_sum).double()
            count += out.count.double()
            correct += out.correct.double()
        totals = torch.stack([loss_sum, count, correct])
        if self.parallel.schedule is not None:
            totals = distributed.all_reduce_sum(totals, self.parallel.pp_group())
        totals = self._dp_sum(totals)
        for part in self.parallel.parts or [self.raw_model]:
            part.train()
        if totals[1] == 0:
            raise RuntimeError("the validation split yielded no batches: prepare more documents or set eval.interval = 0")
        val_loss = float(totals[0] / totals[1])
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "accuracy": float(totals[2] / totals[1])}

    # --- the loop -----------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> list[float]:
        """Train to ``train.steps`` (or stop early after update ``stop_after``, as a preempted job would);
        returns the loss of every step of the run so far. The run dir (and checkpoint dir) are this run's alone
        while it lasts (an advisory lock), and checked writable before the first step."""
        locks = self._claim_dirs()
        try:
            return self._fit(stop_after)
        finally:
            for lock in locks:
                lock.release()

    def _claim_dirs(self) -> list[DirLock]:
        """Rank 0 locks and probes the run and checkpoint dirs; every rank learns whether that worked, so a
        refusal ends all of them with one line (printed by rank 0) instead of leaving the others in a collective."""
        cfg, locks, error = self.cfg, [], ""
        if self.dist.is_main:
            run, ckpt = Path(cfg.logging.run_dir), cfg.checkpoint_dir
            dirs = [(run, "run dir (logging.run_dir)", True)]
            if cfg.checkpoint.interval:
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
                        self.metrics.console(note)
                self._refuse_foreign_steps()
                self._warn_free_space()
            except (LockError, CheckpointError) as exc:
                for lock in locks:
                    lock.release()
                locks, error = [], str(exc)
        failed = torch.tensor(float(bool(error)))
        if self.dist.world_size > 1:
            failed = failed.to(self.device)
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item():
            raise LockError(error or "rank 0 could not claim the run's directories (its message says why)")
        if self.checkpoints is not None and self.dist.is_main:
            self.checkpoints.remove_stale()  # half-written saves of a run that is no longer running
        return locks

    def _refuse_foreign_steps(self) -> None:
        """``resume = "never"`` starts a new run: it must not write into (and prune) another run's steps."""
        cfg = self.cfg
        if cfg.checkpoint.resume != "never" or not cfg.checkpoint.interval:
            return
        steps = CheckpointManager(cfg.checkpoint_dir, clean=False).steps_on_disk()
        if steps:
            raise CheckpointError(f'checkpoint.resume = "never" but {cfg.checkpoint_dir} already holds {len(steps)} '
                                  f"step(s) of another run (newest {steps[-1].name}): use another checkpoint.dir, or "
                                  'checkpoint.resume = "auto" to continue that run')

    def _warn_free_space(self) -> None:
        """A checkpoint holds the fp32 weights and two fp32 moments: 12 bytes a parameter. Warn when short."""
        if not self.cfg.checkpoint.interval:
            return
        import shutil

        need = 12 * sum(p.numel() for p in self.raw_model.parameters())
        free = shutil.disk_usage(self.cfg.checkpoint_dir).free
        if free < need:
            self.metrics.console(f"warning: {self.cfg.checkpoint_dir} has {free / 2 ** 30:.2f} GiB free, one "
                                 f"checkpoint needs about {need / 2 ** 30:.2f} GiB")

    def _fit(self, stop_after: int | None) -> list[float]:
        cfg = self.cfg
        self.maybe_resume()
        if self.dist.is_main:
            run_dir = Path(cfg.logging.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(cfg.to_toml())
        total_steps = cfg.train.steps
        fit_start = time.perf_counter()
        start_step = self.step
        last_step = total_steps if stop_after is None else min(total_steps, stop_after)
        if cfg.eval.interval and self.val_data_factory and self.step == 0:
            self._eval_and_log()  # the starting point of the validation curve
        previous = {sig: signal.signal(sig, self._request_stop)
                    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
        heartbeat = self._start_heartbeat()
        try:
            return self._loop(last_step, total_steps, start_step, fit_start)
        finally:
            if heartbeat is not None:
                stop, thread = heartbeat
                stop.set()
                thread.join()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_heartbeat(self):
        """A thread printing "still in step N" while one step takes longer than ``logging.heartbeat_s``: a hung
        collective shows in the log instead of silence."""
        every = self.cfg.logging.heartbeat_s
        if not every:
            return None
        stop = threading.Event()
        self._step_started = time.monotonic()

        def beat():
            while not stop.wait(every):
                waited = time.monotonic() - self._step_started
                if waited >= every:
                    self.metrics.console(f"heartbeat: rank {self.dist.rank} still in step {self.step + 1} after "
                                         f"{waited:.0f} s", every_rank=True)

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        return stop, thread

    def _request_stop(self, signum, frame) -> None:
        """Save at the end of this step and stop; a second Ctrl-C stops at once, without saving."""
        if signum == signal.SIGINT and self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True

    def _agree_to_stop(self) -> bool:
        """Whether any rank got a stop signal (they may arrive at different moments): all stop together."""
        flag = torch.tensor(float(self.stop_requested))
        if self.dist.world_size > 1:
            flag = flag.to(self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _loop(self, last_step: int, total_steps: int, start_step: int, fit_start: float) -> list[float]:
        cfg = self.cfg
        window_tokens, window_time = 0, 0.0
        while self.step < last_step:
            self._step_started = time.monotonic()
            self._profile_before_step()
            result = self.train_step()
            self._profile_after_step()
            if self.checkpoints is not None:
                self.checkpoints.poll()  # completes a background save once every rank has written it
            self.losses.append(result.loss)
            self.data_skipped += result.skipped
            window_tokens += result.tokens
            window_time += result.seconds
            log_now = cfg.logging.interval and (self.step % cfg.logging.interval == 0 or self.step == total_steps)
            if log_now:
                self._log(result, window_tokens, window_time, start_step, fit_start)
                window_tokens, window_time = 0, 0.0
            if cfg.eval.interval and self.val_data_factory and (
                    self.step % cfg.eval.interval == 0 or self.step == total_steps):
                self._eval_and_log()
            if self._agree_to_stop():
                if self.checkpoints is None:
                    self.checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last,
                                                         self.dist.rank, cfg.checkpoint.keep_every)
                path = self.save()
                self.checkpoints.wait()
                self.metrics.console(f"stop signal: saved checkpoint {path} at step {self.step}; exiting to be "
                                     "requeued")
                self.preempted = True
                break
            if self.checkpoints and cfg.checkpoint.interval and (
                    self.step % cfg.checkpoint.interval == 0 or self.step == last_step):
                path = self.save()
                self.metrics.console(f"saved checkpoint {path}" + (" (writing in the background)"
                                                                    if cfg.checkpoint.async_save else ""))
        if self._profiler is not None:  # stopped inside the profiled range
            self._finish_profile()
        if self.checkpoints is not None:
            self.checkpoints.wait()
        return self.losses

    # --- profiler -----------------------------------------------------------------------------------------
    def _profile_before_step(self) -> None:
        if self.profile and self.step + 1 == self.profile[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self._profiler.__enter__()

    def _profile_after_step(self) -> None:
        if self._profiler is not None:
            self._profiler.step()
            if self.step >= self.profile[1]:
                self._finish_profile()

    def _finish_profile(self) -> None:
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        first, last = self.profile
        last = min(last, self.step)
        out = Path(self.cfg.logging.run_dir) / "profile" / f"steps-{first}-{last}-rank{self.dist.rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        prof.export_chrome_trace(str(partial))
        partial.replace(out)
        self.metrics.console(f"profiler trace of steps {first}-{last}: {out} (open in chrome://tracing or "
                             "ui.perfetto.dev)")

    def _eval_and_log(self) -> None:
        values = self.evaluate()
        self.metrics.log(self.step, values)
        self.metrics.console(f"eval step {self.step} | val loss {values['val_loss']:.4f} | "
                             f"val ppl {values['val_ppl']:.2f} | accuracy {values['accuracy']:.4f}")

    def _log(self, result: StepResult, tokens: int, seconds: float, start_step: int, fit_start: float) -> None:
        tokens_per_s = tokens / max(seconds, 1e-9)
        flops = self.flops_per_token * tokens_per_s
        mfu = flops / (self.peak * self.dist.world_size) if self.peak else None
        values = {
            "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / self.dist.world_size,
            "mfu": mfu, "step_time_s": result.seconds, "data_wait_s": result.data_wait_s,
            "data_skipped": self.data_skipped,
            "skipped_updates": self.skipped_updates,
            **memory_stats(self.device),
        }
        self.metrics.log(self.step, values)
        done = self.step - start_step
        eta = (time.perf_counter() - fit_start) / max(done, 1) * (self.cfg.train.steps - self.step)
        self.metrics.console(
            f"step {self.step}/{self.cfg.train.steps} | loss {result.loss:.4f} | lr {result.lr:.2e} | "
            f"grad {result.grad_norm:.3f} | {tokens_per_s / 1e3:.1f}k tok/s | "
            f"mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | {1e3 * result.seconds:.0f} ms | eta {eta:.0f}s"
        )
