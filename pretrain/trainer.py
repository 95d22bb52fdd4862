"""The training loop, model-agnostic: schedule, cadence (log, evaluate, checkpoint), stop signals, the
non-finite guard and metrics.

A task (``pretrain/tasks.py``) turns one batch into a summed loss; a step engine (``pretrain/engine/``) runs the
step's forward, backward and optimizer update for the parallel layout. Each step fetches its ``grad_accum``
micro-batches first, counts their targets across all ranks, and the engine back-propagates ``loss_sum / count``:
the gradient of the mean over the whole global batch, whatever the accumulation or data-parallel split.
"""

from __future__ import annotations

import collections
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.callbacks import default_callbacks
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.session import claim_dirs, resume_step
from pretrain.config import Config
from pretrain.distributed import DistInfo
from pretrain.engine import build_engine
from pretrain.errors import DataError
from pretrain.metrics import MetricsLogger, measure_matmul_flops, memory_stats, peak_flops
from pretrain.models.flops import flops_per_token
from pretrain.models.moe import moe_layers
from pretrain.optim import build_optimizer, param_groups, set_lr  # noqa: F401  (param_groups: re-exported)
from pretrain.optim import lr_at as schedule_lr
from pretrain.parallel.parallelize import Parallelized
from pretrain.step import StepContext

META_KEYS = ("index", "skipped", "source")  # batch entries the loader adds for bookkeeping, not model inputs
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after saving; the launcher requeues and the run resumes


def lr_at(step: int, cfg: Config) -> float:
    return schedule_lr(step, cfg.optim, cfg.schedule, cfg.train.steps)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message is one line for the user."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    skipped: int = 0
    data_wait_s: float = 0.0  # of ``seconds``, waiting for the loader
    extras: dict[str, float] = field(default_factory=dict)  # the task's extra terms, per target


ETA_WINDOW_STEPS = 200  # the ETA is the pace of the last this-many steps, not of the last logging interval


def rate(x: float) -> str:
    """Tokens per second for the console: 512, 12.3k, 1.23M."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    return f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:.0f}" if x < 1e3 else f"{x / 1e3:.2f}k"


def duration(seconds: float) -> str:
    """42s, 7m05s, 3h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Trainer:
    """Drives a parallelized model through a step engine. Losses and counts are reduced over the data-parallel
    ranks only: tensor- and pipeline-parallel ranks share their samples."""

    def __init__(self, cfg: Config, parallel: Parallelized, task, train_data, dist: DistInfo,
                 val_data_factory=None, metrics: MetricsLogger | None = None):
        self.cfg, self.data, self.dist, self.device = cfg, train_data, dist, dist.device
        self.parallel, self.raw_model = parallel, parallel.module
        # losses, counts and gradients are summed / averaged over the ranks holding different tokens (dp × cp)
        self.grad_ranks, self.grad_group = parallel.grad_ranks, parallel.grad_group()
        zero1 = (self.grad_group if cfg.parallel.engine == "native" and cfg.parallel.zero_stage == 1
                 and self.grad_ranks > 1 else None)
        optimizer = build_optimizer(self.raw_model, cfg.optim, self.device, zero1)
        self.engine = build_engine(cfg, parallel, task, optimizer, self.device, self.grad_ranks)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.val_data_factory = val_data_factory
        self.downstream = None  # pretrain.downstream.Downstream: eval.tasks, set by build_trainer
        self.metrics = metrics or MetricsLogger(cfg.logging.run_dir, enabled=False)
        self.step = self.data_skipped = self.skipped_updates = self.nonfinite_in_a_row = 0
        self.stop_requested = self.preempted = False  # a stop signal: save at the end of the step and stop
        self.losses: list[float] = []
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak = peak_flops(self.device, cfg.logging.peak_tflops)
        if cfg.logging.measure_peak:
            half = cfg.train.dtype == "bf16" and self.device.type == "cuda"
            self.peak = measure_matmul_flops(self.device, torch.bfloat16 if half else torch.float32)
            self.metrics.console(f"MFU peak: measured {self.peak / 1e12:.1f} TFLOP/s (dense matmul on "
                                 f"{self.device.type})")
        self._eta_window: collections.deque = collections.deque()  # (step, time) of recent log lines
        self.moe_layers = moe_layers(self.raw_model)
        self.step_metrics: dict[str, float] = {}  # what callbacks add to the step's log line (MoE statistics)
        self.callbacks = default_callbacks(cfg.logging, cfg.model)
        self.checkpoints = None
        c = cfg.checkpoint
        may_resume = c.resume != "never" and (c.resume != "auto" or cfg.checkpoint_dir.is_dir())
        if c.interval > 0 or may_resume:
            self.checkpoints = self._manager()

    @property
    def task(self):  # the engine runs it; replacing it here replaces it there
        return self.engine.task

    @task.setter
    def task(self, task) -> None:
        self.engine.task = task

    def _manager(self) -> CheckpointManager:
        c = self.cfg.checkpoint
        return CheckpointManager(self.cfg.checkpoint_dir, c.keep_last, self.dist.rank, c.keep_every, clean=False)

    # --- checkpoints --------------------------------------------------------------------------------------
    def maybe_resume(self) -> bool:
        if self.checkpoints is None:
            return False
        path = resume_step(self.cfg, self.checkpoints, getattr(self.data, "tokenizer_hash", None),
                           self.metrics.console)
        if path is None:
            return False
        state = self.checkpoints.load(path, self.raw_model, self.optimizer, self.engine.checkpoint_engine)
        if state.get("model_only"):  # weights to continue pretraining from (e.g. imported from Hugging Face)
            self.metrics.console(f"initialised the model from {path}")
            return True
        self.step, self.losses = int(state["step"]), list(state.get("losses", []))
        self.data_skipped = int(state.get("data_skipped", 0))
        self.data.load_state_dict(state["data"])
        self.metrics.console(f"resumed from {path} at step {self.step}")
        return True

    def save(self) -> Path:
        state = {"data": self.data.state_dict(), "losses": self.losses, "data_skipped": self.data_skipped,
                 "tokenizer_hash": getattr(self.data, "tokenizer_hash", None)}
        return self.checkpoints.save(self.step, self.raw_model, self.optimizer, state, self.cfg.to_toml(),
                                     self.engine.checkpoint_engine, async_save=self.cfg.checkpoint.async_save)

    def _hf_copy_due(self) -> bool:
        c = self.cfg.checkpoint
        periodic = c.hf_interval > 0 and self.step % c.hf_interval == 0
        return periodic or (c.hf_at_end and self.step == self.cfg.train.steps)

    def save_hf_copy(self, path: Path) -> None:
        """The Hugging Face copy of the native step ``path`` (``checkpoint.hf_interval`` / ``hf_at_end``), once
        that step is complete: rank 0 writes it (checkpoint/hf.py ``write_hf_copy``), every rank learns whether
        that worked, so a failure ends all of them with rank 0's line."""
        from pretrain.checkpoint.hf import run_tokenizer, write_hf_copy
        from pretrain.checkpoint.manager import CheckpointError
        from pretrain.files import disk_error

        self.checkpoints.wait()
        error = [""]
        if self.dist.is_main:
            try:
                out = write_hf_copy(path, self.cfg.hf_dir / path.name, run_tokenizer(self.cfg))
                self.metrics.console(f"wrote Hugging Face copy {out}")
            except CheckpointError as exc:
                error[0] = str(exc)
            except OSError as exc:
                error[0] = disk_error(exc, self.cfg.hf_dir) or f"cannot write {self.cfg.hf_dir}: {exc}"
        if self.dist.world_size > 1:
            torch.distributed.broadcast_object_list(error, src=0)
        if error[0]:
            raise CheckpointError(f"Hugging Face copy of {path.name}: {error[0]}" if self.dist.is_main else error[0])

    def _grad_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (the ones holding different samples)."""
        return distributed.all_reduce_sum(value, self.grad_group) if self.grad_ranks > 1 else value

    # --- one step -----------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        start, cfg = time.perf_counter(), self.cfg
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        loaded = [self.data.next_batch() for _ in range(cfg.train.grad_accum)]
        data_wait = time.perf_counter() - start
        skipped = sum(int(b["skipped"].sum()) for b in loaded if "skipped" in b)
        micro_batches = [self.parallel.split_batch({k: v.to(self.device, non_blocking=True) for k, v in b.items()
                                                    if k not in META_KEYS}) for b in loaded]
        count = torch.stack([self.task.count(b) for b in micro_batches]).sum().to(torch.float64)
        count, skipped = self._grad_sum(
            torch.stack([count, torch.tensor(float(skipped), dtype=torch.float64, device=self.device)]))
        # DDP / FSDP average gradients over the gradient ranks: the step's scale multiplies by their number
        totals = self.engine.forward_backward(micro_batches, StepContext(count, self.grad_ranks))
        names = sorted(totals.extras)
        reduced = self._grad_sum(torch.stack([totals.loss, *(totals.extras[n] for n in names)]))
        loss_total, extras = reduced[0], dict(zip(names, reduced[1:]))
        if self.step + 1 in cfg.train.inject_nan_steps:  # fault drill for the guard below and the launchers
            loss_total = loss_total * float("nan")
        grad_norm = float(self.engine.clip(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")))
        loss = float(loss_total / count.clamp(min=1))
        if math.isfinite(loss) and math.isfinite(grad_norm):  # every rank sees the same values: all agree
            self.engine.step()
            self.nonfinite_in_a_row = 0
        else:
            self._nonfinite(loss, grad_norm)
        self.engine.zero_grad()
        self.step += 1
        tokens = sum(b["tokens"].numel() for b in micro_batches) * self.grad_ranks
        return StepResult(loss, grad_norm, lr, tokens, time.perf_counter() - start, int(skipped), data_wait,
                          {n: float(v / count.clamp(min=1)) for n, v in extras.items()})

    def _nonfinite(self, loss: float, grad_norm: float) -> None:
        self.nonfinite_in_a_row += 1
        if self.engine.can_skip_update:
            self.skipped_updates += 1
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            raise TrainingError(f"loss or gradient norm non-finite for {self.nonfinite_in_a_row} steps in a row "
                                f"(up to step {self.step + 1}): lower optim.lr or check the data")
        what = "update skipped" if self.engine.can_skip_update else "the engine had applied the update"
        self.metrics.console(f"step {self.step + 1}: non-finite loss ({loss}) or grad norm ({grad_norm}); {what}")

    # --- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        data = self.val_data_factory()
        self.engine.eval_mode()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.eval.steps):
            try:
                batch = self.parallel.split_batch({k: v.to(self.device) for k, v in data.next_batch().items()
                                                   if k not in META_KEYS})
            except StopIteration:
                break
            got = self.engine.eval_batch(batch)
            totals += torch.stack([got.loss, got.count, got.correct])
        totals = self._grad_sum(totals)
        if totals[1] == 0:
            raise DataError("the validation split yielded no batches: prepare more documents or set eval.interval = 0")
        val_loss = float(totals[0] / totals[1])
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "accuracy": float(totals[2] / totals[1])}

    # --- the loop -----------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> list[float]:
        """Train to ``train.steps`` (or stop early after update ``stop_after``, as a preempted job would);
        returns the loss of every step of the run so far. The run dir (and checkpoint dir) are this run's alone
        while it lasts (an advisory lock), and checked writable before the first step."""
        locks = claim_dirs(self.cfg, self.dist.is_main, self.dist.world_size, self.device,
                           sum(p.numel() for p in self.raw_model.parameters()), self.metrics.console)
        try:
            if self.checkpoints is not None and self.dist.is_main:
                self.checkpoints.remove_stale()  # half-written saves of a run that is no longer running
            resumed = self.maybe_resume()
            self.metrics.console(self.banner(resumed))
            if self.dist.is_main:
                run_dir = Path(self.cfg.logging.run_dir)
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "config.toml").write_text(self.cfg.to_toml())
            if self.cfg.eval.interval and self.val_data_factory and self.step == 0:
                self._eval_and_log()  # the starting point of the validation curve
            stops = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
            previous = {sig: signal.signal(sig, self._request_stop) for sig in stops}
            for callback in self.callbacks:
                callback.fit_start(self)
            try:
                return self._loop(stop_after)
            finally:
                for callback in self.callbacks:
                    callback.fit_end(self)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            for lock in locks:
                lock.release()

    def banner(self, resumed: bool) -> str:
        """What this run is, before its first step (what Megatron and torchtitan print): the model, tokens a step,
        the layout, device and precision, where it writes."""
        from pretrain.models.flops import num_params

        c, m, d = self.cfg, self.cfg.model, self.parallel.dims
        n = num_params(m)
        tokens = c.train.micro_batch_size * c.train.grad_accum * d.dp * m.seq_len
        heads = (f"{m.n_heads} MLA heads of {m.qk_nope_head_dim}+{m.qk_rope_head_dim} / {m.v_head_dim} "
                 f"(latent {m.kv_lora_rank})" if m.mla else f"{m.n_heads} heads of {m.head_size}")
        shape = f"{m.n_layers} layers × d_model {m.d_model}, {heads}" + (
            f" ({m.kv_heads} kv)" if m.kv_heads != m.n_heads and not m.mla else "") + (
            f", {m.n_experts} experts top-{m.moe_top_k}" if m.n_experts else "")
        start = f"from step {self.step}" if resumed and self.step else "from an imported model" if resumed else \
            "from scratch"
        ckpt = f"every {c.checkpoint.interval} steps to {c.checkpoint_dir}" if c.checkpoint.interval else "at the end only" \
            if c.checkpoint.dir else "off"
        return (f"pretrain: {m.arch}/{m.flavor} {n / 1e6:,.1f}M parameters ({shape}) | {tokens:,} tokens a step "
                f"({c.train.micro_batch_size} × {m.seq_len} × accum {c.train.grad_accum} × dp {d.dp}), "
                f"{c.train.steps} steps {start} | {self.dist.world_size} process{'es' if self.dist.world_size > 1 else ''} = "
                f"{d.describe()} | "
                f"{self.device.type}, {c.train.dtype}, {m.kernels} kernels | run dir {c.logging.run_dir}, "
                f"checkpoints {ckpt}")

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

    def _loop(self, stop_after: int | None) -> list[float]:
        cfg, total_steps, start_step, fit_start = self.cfg, self.cfg.train.steps, self.step, time.perf_counter()
        last_step = total_steps if stop_after is None else min(total_steps, stop_after)
        window_tokens, window_time = 0, 0.0
        while self.step < last_step:
            for callback in self.callbacks:
                callback.step_start(self)
            result = self.train_step()
            for callback in self.callbacks:
                callback.step_end(self)
            if self.checkpoints is not None:
                self.checkpoints.poll()  # completes a background save once every rank has written it
            self.losses.append(result.loss)
            self.data_skipped += result.skipped
            window_tokens, window_time = window_tokens + result.tokens, window_time + result.seconds
            if cfg.logging.interval and (self.step % cfg.logging.interval == 0 or self.step == total_steps):
                self._log(result, window_tokens, window_time, start_step, fit_start)
                window_tokens, window_time = 0, 0.0
            if cfg.eval.interval and self.val_data_factory and (
                    self.step % cfg.eval.interval == 0 or self.step == total_steps):
                self._eval_and_log()
            every = cfg.eval.downstream_interval or cfg.eval.interval
            if self.downstream is not None and (self.step == total_steps or every and self.step % every == 0):
                self._downstream_and_log()
            if self._agree_to_stop():
                self.checkpoints = self.checkpoints or self._manager()
                path = self.save()
                self.checkpoints.wait()
                self.metrics.console(f"stop signal: saved checkpoint {path} at step {self.step}; exiting to be "
                                     "requeued")
                self.preempted = True
                break
            hf_copy = self._hf_copy_due()
            if self.checkpoints and cfg.checkpoint.interval and (
                    self.step % cfg.checkpoint.interval == 0 or self.step == last_step) or hf_copy:
                self.checkpoints = self.checkpoints or self._manager()
                path = self.save()
                self.metrics.console(f"saved checkpoint {path}" + (" (writing in the background)"
                                                                    if cfg.checkpoint.async_save and not hf_copy else ""))
                if hf_copy:
                    self.save_hf_copy(path)
        if self.checkpoints is not None:
            self.checkpoints.wait()
        return self.losses

    # --- logging ------------------------------------------------------------------------------------------
    def _eval_and_log(self) -> None:
        values = self.evaluate()
        self.metrics.log(self.step, values)
        self.metrics.console(f"eval step {self.step} | val loss {values['val_loss']:.4f} | "
                             f"val ppl {values['val_ppl']:.2f} | accuracy {values['accuracy']:.4f}")

    def downstream_scores(self) -> dict[str, float]:
        """The downstream tasks (eval.tasks) on the model as it is: items split over the data-parallel ranks (the
        tensor-, context- and pipeline-parallel peers of a rank score the same items together), sums reduced
        exactly over them; no gradient, no random draw, the training mode restored."""
        from pretrain import distributed

        p = self.parallel

        def most(count: torch.Tensor) -> torch.Tensor:  # every rank runs as many forwards as the busiest
            return -distributed.all_reduce_min(-count)

        dp_group = p.dp_group()
        reduce = (lambda sums: distributed.all_reduce_sum(sums, dp_group)) if p.dp_size > 1 else None
        width = 1
        if p.context is not None:  # the sequence in 2·cp chunks
            width = 2 * p.context.cp
        if p.dims.tp > 1 and self.cfg.parallel.sequence_parallel:
            width = width * p.dims.tp // math.gcd(width, p.dims.tp)
        per_token = None
        if p.stages:
            per_token = self.engine.per_token
        elif p.context is not None:
            per_token = self._context_scorer()
        with self.engine.autocast():
            # a context scored once for its choices (prefix trees: the dense reference attention) where the model's
            # own forward takes the branch ids; pipeline stages and context-parallel chunks score a request a row.
            # The head only where a target is, but under tensor parallelism (its vocab-sharded head)
            return self.downstream.evaluate(p.module if p.stages else self.raw_model, self.device, p.dp_rank,
                                            p.dp_size, reduce, most, per_token, width,
                                            (self.cfg.train.micro_batch_size, self.cfg.model.seq_len) if p.stages
                                            else None, shared=per_token is None,
                                            select=per_token is None and p.dims.tp == 1)

    def _context_scorer(self):
        """Scores of a batch under context parallelism: each cp rank scores its chunks' tokens, put back at their
        places in the whole sequence and summed over the cp group, so every cp rank holds the whole batch's."""
        from pretrain import distributed
        from pretrain.downstream import token_scores

        p, ctx = self.parallel, self.parallel.context
        group = p.mesh.cp.get_group()

        def per_token(tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            local = p.split_batch({"tokens": tokens, "targets": targets})
            logits = self.raw_model(local["tokens"])
            if hasattr(logits, "full_tensor"):
                logits = logits.full_tensor()
            logprob, hit = token_scores(logits, local["targets"])
            places = ctx.positions(local["tokens"].shape[1], tokens.device)
            whole = torch.zeros(2, *tokens.shape, dtype=torch.float64, device=tokens.device)
            whole[0][:, places], whole[1][:, places] = logprob, hit.double()
            distributed.all_reduce_sum(whole, group)
            return whole[0], whole[1] > 0.5
        return per_token

    def _downstream_and_log(self) -> None:
        values = self.downstream_scores()
        self.metrics.log(self.step, values)
        self.metrics.console(f"downstream step {self.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def _log(self, result: StepResult, tokens: int, seconds: float, start_step: int, fit_start: float) -> None:
        tokens_per_s = tokens / max(seconds, 1e-9)
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.dist.world_size) if self.peak else None
        values = {
            "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / self.dist.world_size,
            "mfu": mfu, "step_time_s": result.seconds, "data_wait_s": result.data_wait_s,
            "data_skipped": self.data_skipped, "skipped_updates": self.skipped_updates,
            **result.extras, **self.step_metrics, **memory_stats(self.device),
        }
        self.metrics.log(self.step, values)
        now = time.perf_counter()
        window = self._eta_window
        if not window:
            window.append((start_step, fit_start))
        window.append((self.step, now))
        while len(window) > 2 and window[-1][0] - window[1][0] >= ETA_WINDOW_STEPS:
            window.popleft()  # the last ETA_WINDOW_STEPS steps (or all since the start): evals and saves included
        (first_step, first_time), _ = window[0], window[-1]
        eta = (now - first_time) / max(self.step - first_step, 1) * (self.cfg.train.steps - self.step)
        self.metrics.console(
            f"step {self.step}/{self.cfg.train.steps} | loss {result.loss:.4f} | lr {result.lr:.2e} | "
            f"grad {result.grad_norm:.3f} | {rate(tokens_per_s)} tok/s | "
            f"mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | {1e3 * result.seconds:.0f} ms | eta {duration(eta)}"
        )
